"""Prometheus metrics of an AsyncLLM, in vLLM's names with the `kiln:` prefix.

Gauges are read from the engine's stats snapshot when scraped; counters and histograms are fed by
the engine loop after each step (`AsyncLLM.stat_loggers`). Each server has its own registry, so
several can live in one process (the tests start more than one).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln.runtime.async_engine import AsyncLLM, EngineStats, IterationStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, llm: AsyncLLM, model_name: str):
        self.registry = r = CollectorRegistry()
        label = ["model_name"]

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, label, registry=r).labels(model_name).set_function(read)

        gauge("kiln:num_requests_running", "Requests in the running batch.", lambda: llm.stats.num_running)
        gauge("kiln:num_requests_waiting", "Requests waiting to be scheduled.", lambda: llm.stats.num_waiting)
        if not llm.is_pooling:
            gauge("kiln:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                  lambda: llm.stats.kv_cache_usage or 0.0)
        self.prompt_tokens = Counter("kiln:prompt_tokens", "Prompt tokens processed.", label,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("kiln:generation_tokens", "Tokens generated.", label,
                                         registry=r).labels(model_name)
        self.preemptions = Counter("kiln:num_preemptions", "Requests preempted (recomputed later).", label,
                                   registry=r).labels(model_name)
        self.request_success = Counter("kiln:request_success", "Requests finished, by finish reason.",
                                       label + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = Histogram("kiln:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("kiln:time_per_output_token_seconds", "Mean time per output token after the first, "
                              "per request.", label, buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("kiln:e2e_request_latency_seconds", "Request latency in the engine.", label,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self._preemptions_seen = 0
        llm.stat_loggers.append(self.record)

    def record(self, it: IterationStats, stats: EngineStats) -> None:
        """Called on the engine thread after a loop turn that did something."""
        if it.num_prompt_tokens:
            self.prompt_tokens.inc(it.num_prompt_tokens)
        if it.num_generation_tokens:
            self.generation_tokens.inc(it.num_generation_tokens)
        for t in it.time_to_first_token:
            self.ttft.observe(t)
        for t in it.time_per_output_token:
            self.tpot.observe(t)
        for t in it.e2e_latency:
            self.e2e.observe(t)
        for reason in it.finish_reasons:
            self.request_success.labels(self.model_name, reason).inc()
        preemptions = stats.num_preemptions
        if preemptions > self._preemptions_seen:
            self.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions

    def render(self) -> bytes:
        return generate_latest(self.registry)
