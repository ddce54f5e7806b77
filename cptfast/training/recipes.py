"""Continued-pretraining recipes that are pure functions of the config: mixture phases and the
replay plan (how many tokens of each source a run consumes, and how many epochs that is)."""

from __future__ import annotations

from cptfast.training.config import Config


def phase_boundaries(config: Config) -> list[tuple[int, dict[str, float]]]:
    """(first step, weights) of every mixture phase, the base mixture first."""
    base = {name: source.weight for name, source in config.data.sources.items()}
    phases = [(0, base)]
    for phase in config.data.phases:
        weights = {name: phase.weights.get(name, 0.0) for name in base}
        phases.append((round(phase.at * config.train.steps), weights))
    return phases


def weights_at(config: Config, step: int) -> dict[str, float]:
    """The mixture weights in effect for optimizer step ``step`` (0-based)."""
    return [weights for start, weights in phase_boundaries(config) if start <= step][-1]


def phase_starting_at(config: Config, step: int) -> dict[str, float] | None:
    """The weights of the phase that starts at ``step`` (after the first), else None."""
    for start, weights in phase_boundaries(config)[1:]:
        if start == step:
            return weights
    return None


def mixture_plan(config: Config, source_tokens: dict[str, int], tokens_per_step: int
                 ) -> list[dict]:
    """Per source: the tokens the whole run takes from it and the epochs that makes."""
    phases = phase_boundaries(config)
    ends = [start for start, _ in phases[1:]] + [config.train.steps]
    taken = dict.fromkeys(source_tokens, 0.0)
    for (start, weights), end in zip(phases, ends):
        total = sum(weights.values())
        for name, weight in weights.items():
            taken[name] += max(0, end - start) * tokens_per_step * weight / total
    run_total = sum(taken.values()) or 1.0
    return [{"source": name, "tokens": int(taken[name]), "share": taken[name] / run_total,
             "epochs": taken[name] / source_tokens[name] if source_tokens[name] else 0.0}
            for name in source_tokens]


def format_plan(plan: list[dict]) -> str:
    lines = ["source              tokens taken   share   epochs"]
    for row in plan:
        warning = "  (repeats: more than 4 epochs)" if row["epochs"] > 4 else ""
        lines.append(f"{row['source']:<16} {row['tokens']:>13,} {row['share']:>7.1%} "
                     f"{row['epochs']:>8.2f}{warning}")
    return "\n".join(lines)


def plan_from_manifests(config: Config, world_size: int = 1) -> list[dict]:
    """The replay plan before anything is loaded: source sizes from the shard manifests."""
    from cptfast.data import open_shards

    sizes = {name: open_shards(source.path, check_tokens=False).manifest.tokens
             for name, source in config.data.sources.items()}
    tokens_per_step = config.optim.global_batch_tokens or (
        config.data.seq_len * config.data.batch_size * world_size)
    return mixture_plan(config, sizes, tokens_per_step)
