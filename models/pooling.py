"""What a pooling model is, on the model side.

A pooling model is an `nn.Module` built as `Model(config, architecture, max_positions)` whose
parameter names are the HF checkpoint's (after `weight_prefix_map`), with:

- `forward(input_ids [T], positions [T], token_type_ids [T] | None = None) -> hidden [T, H]`:
  the flattened batch as the generate models take it; positions restart at 0 for each sequence.
  Attention goes through `ops.attention(..., causal=self.is_causal)`; a pooling step keeps no KV
  cache, so every sequence is computed whole in one step.
- `default_pooling_type`: "CLS", "MEAN", "LAST", "ALL" or "STEP": which hidden rows the runtime's
  pooler takes from each sequence when the user's PoolerConfig does not say.
- `head(pooled [N, H]) -> [N, C]` (optional): what turns pooled hidden states into the task's
  output (a classifier's logits, a reward score); absent, the pooled states are the output.
- `num_labels` (with a head) and `is_causal`.
- `usable_positions(config) -> int` (optional classmethod/staticmethod): the longest sequence the
  model serves when it differs from `max_position_embeddings` (RoBERTa counts from pad id + 1).

The runtime (runtime/pooler.py) does the rest: pooling, the head, then normalisation, softmax or
sigmoid, and Matryoshka truncation, as the task and PoolingParams ask.
"""
