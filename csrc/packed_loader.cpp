#include "packed_loader.h"

#include <numeric>
#include <stdexcept>
#include <string>

namespace cptfast {

PackedLoader::PackedLoader(std::vector<std::shared_ptr<Source>> sources,
                           std::vector<double> weights, LoaderOptions options, MixState start,
                           std::vector<std::string> cache_prefixes)
    : options_(options), planned_(std::move(start)) {
  if (!cache_prefixes.empty() && cache_prefixes.size() != sources.size()) {
    throw std::invalid_argument("need one index cache prefix per source");
  }
  if (sources.empty()) throw std::invalid_argument("the loader needs at least one source");
  if (weights.size() != sources.size()) {
    throw std::invalid_argument("got " + std::to_string(weights.size()) + " weights for " +
                                std::to_string(sources.size()) + " sources");
  }
  double sum = 0;
  for (double w : weights) {
    if (!(w >= 0)) throw std::invalid_argument("weights must be non-negative numbers");
    sum += w;
  }
  if (!(sum > 0)) throw std::invalid_argument("weights must sum to a positive number");
  for (double w : weights) probabilities_.push_back(w / sum);
  if (options_.seq_len < 2) throw std::invalid_argument("seq_len must be at least 2");
  if (options_.batch_size < 1) throw std::invalid_argument("batch_size must be at least 1");
  if (options_.window < 1) throw std::invalid_argument("window must be at least 1");
  if (options_.world_size < 1 || options_.rank < 0 || options_.rank >= options_.world_size) {
    throw std::invalid_argument("rank must lie in [0, world_size)");
  }
  if (options_.prefetch < 1) throw std::invalid_argument("prefetch must be at least 1");
  std::vector<TokenType> types;
  for (const auto& source : sources) types.push_back(source->token_type());
  token_type_ = common_token_type(types);  // sources of other dtypes are widened when gathered
  for (size_t s = 0; s < sources.size(); ++s) {
    streams_.push_back(std::make_unique<SourceStream>(sources[s], s, options_.packing,
                                                      options_.seq_len, options_.window,
                                                      options_.seed,
                                                      cache_prefixes.empty() ? "" : cache_prefixes[s]));
  }
  if (planned_.rows.empty()) planned_.rows.assign(sources.size(), 0);
  if (planned_.tokens.empty()) planned_.tokens.assign(sources.size(), 0);
  if (planned_.rows.size() != sources.size() || planned_.tokens.size() != sources.size()) {
    throw std::invalid_argument("the start state names a different number of sources");
  }
  for (int64_t i = 0; i < options_.num_threads; ++i) threads_.emplace_back([this] { worker(); });
}

PackedLoader::~PackedLoader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (auto& t : threads_) t.join();
}

PackedLoader::Plan PackedLoader::plan_next() {
  const int64_t world = options_.world_size, per_rank = options_.batch_size;
  Plan plan;
  plan.index = next_to_plan_++;
  // Walk every global row of this step (all ranks' rows: the blend is global), keep ours.
  std::vector<int64_t> next_row_tokens(streams_.size(), 0);
  for (int64_t i = 0; i < world * per_rank; ++i) {
    for (size_t s = 0; s < streams_.size(); ++s) {
      if (probabilities_[s] > 0) next_row_tokens[s] = streams_[s]->row_tokens(planned_.rows[s]);
    }
    const int s = pick_source(probabilities_, planned_, next_row_tokens);
    const int64_t row = planned_.rows[s]++;
    if (i % world == options_.rank) {
      plan.source.push_back(s);
      plan.source_row.push_back(row);
      plan.global_row.push_back(planned_.global_row);
    }
    planned_.tokens[s] += next_row_tokens[s];
    planned_.global_row += 1;
  }
  plan.state_after = planned_;
  return plan;
}

std::unique_ptr<CompactBatch> PackedLoader::gather(const Plan& plan) {
  auto batch = std::make_unique<CompactBatch>();
  const int64_t rows = static_cast<int64_t>(plan.source.size());
  const int64_t slots = options_.seq_len + 1, isz = token_itemsize(token_type_);
  batch->rows = rows;
  batch->seq_len = options_.seq_len;
  batch->token_type = token_type_;
  batch->pad_id = options_.pad_id;
  batch->tokens.resize(rows * slots * isz);
  batch->row_used.resize(rows);
  batch->row_segments.push_back(0);
  for (int64_t b = 0; b < rows; ++b) {
    RowSink sink{batch->tokens.data() + b * slots * isz, &batch->segment_starts};
    batch->row_used[b] = streams_[plan.source[b]]->fill_row(plan.source_row[b], sink,
                                                            token_type_, options_.pad_id);
    batch->row_segments.push_back(static_cast<int32_t>(batch->segment_starts.size()));
  }
  batch->row_source = plan.source;
  batch->source_row = plan.source_row;
  batch->global_row = plan.global_row;
  batch->state_after = plan.state_after;
  if (options_.expand) {
    const int64_t n = rows * options_.seq_len;
    batch->input_ids.resize(n);
    batch->labels.resize(n);
    batch->position_ids.resize(n);
    const CompactBatchView view = batch->view();
    const ExpandedOutputs out{batch->input_ids.data(), batch->labels.data(),
                              batch->position_ids.data()};
    for (int64_t b = 0; b < rows; ++b) expand_row(view, b, out);
    batch->cu_seqlens.resize(count_sequences(view) + 1);
    batch->max_seqlen = fill_cu_seqlens(view, batch->cu_seqlens.data());
    batch->expanded = true;
  }
  return batch;
}

void PackedLoader::worker() {
  while (true) {
    Plan plan;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [this] {
        return stopping_ || error_ || next_to_plan_ - next_to_deliver_ < options_.prefetch;
      });
      if (stopping_ || error_) return;
      try {
        plan = plan_next();
      } catch (...) {
        error_ = std::current_exception();
        changed_.notify_all();
        return;
      }
    }
    try {
      auto batch = gather(plan);
      std::lock_guard<std::mutex> lock(mutex_);
      ready_[plan.index] = std::move(batch);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
    }
    changed_.notify_all();
  }
}

std::unique_ptr<CompactBatch> PackedLoader::next() {
  if (threads_.empty()) {  // synchronous mode
    Plan plan;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      plan = plan_next();
    }
    next_to_deliver_ += 1;
    return gather(plan);
  }
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return error_ || ready_.count(next_to_deliver_) > 0; });
  if (ready_.count(next_to_deliver_) == 0) std::rethrow_exception(error_);
  auto batch = std::move(ready_[next_to_deliver_]);
  ready_.erase(next_to_deliver_++);
  lock.unlock();
  changed_.notify_all();
  return batch;
}

}  // namespace cptfast
