"""``python fault_injection.py KILL ARGS...`` runs ``cptfast ARGS...`` (also as torchrun's
script) with a SIGKILL injected by patching, for the resumption and failure tests: the product
carries no test hooks. KILL is "step:N" (after step N and its checkpoint, at its stop check) or
"checkpoint:N" (half-way through writing checkpoint N: its state and export on disk, not yet
committed), optionally with ",rank:R" (only rank R dies); empty, nothing is injected."""

import os
import signal
import sys


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    points = dict(part.split(":") for part in spec.split(",") if part)
    if "rank" in points and int(points.pop("rank")) != int(os.environ.get("RANK", "0")):
        return
    from cptfast.training import checkpoint, distributed

    if "step" in points:
        label = f"step {int(points['step'])}'s stop check"  # the loop's all-reduce after a step
        reduce_max = distributed.Context.max

        def max_or_die(self, value, device, what="an all-reduce"):
            if what == label:
                _die()
            return reduce_max(self, value, device, what)

        distributed.Context.max = max_or_die
    if "checkpoint" in points:
        doomed, saving = int(points["checkpoint"]), []
        save, rng_state = checkpoint.save, checkpoint._rng_state

        def save_noting_the_step(run_dir, step, *args, **kwargs):
            saving.append(step)
            try:
                return save(run_dir, step, *args, **kwargs)
            finally:
                saving.pop()

        def rng_state_or_die():  # gathered after the state and export are written
            if saving and saving[-1] == doomed:
                _die()
            return rng_state()

        checkpoint.save, checkpoint._rng_state = save_noting_the_step, rng_state_or_die


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["cptfast", *sys.argv[2:]]
    from cptfast.cli import main
    sys.exit(main())
