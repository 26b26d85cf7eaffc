"""The runtime: requests, scheduler, paged KV cache, model runner, sampler, the LLM API, the CLI."""
