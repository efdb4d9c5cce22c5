"""Prometheus metrics of one service instance (its own registry, so that tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open files (Linux)
        self.running = Gauge("medusa_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("medusa_requests_waiting", "Sequences waiting for a batch slot", registry=r)
        self.success = Counter("medusa_request_success", "Completed requests", ["finish_reason"], registry=r)
        self.failures = Counter("medusa_request_failure", "Requests failed by the engine", registry=r)
        self.timeouts = Counter("medusa_request_timeout", "Requests ended by the request timeout", registry=r)
        self.prompt_tokens = Counter("medusa_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("medusa_generation_tokens", "Tokens generated", registry=r)
        self.decode_steps = Counter("medusa_decode_steps", "Engine decode steps (one per running batch)", registry=r)
        self.ttft = Histogram("medusa_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("medusa_inter_token_latency_seconds", "Time per output token after the first",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("medusa_e2e_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.accepted = Histogram("medusa_accepted_tokens_per_step", "Tokens emitted per decode step, per sequence",
                                  registry=r, buckets=(1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6))
        self.tree_nodes = Gauge("medusa_tree_nodes", "Tokens verified per speculative sequence in the last step "
                                "that had one (root included; adaptive trees shrink as the batch grows)", registry=r)
        self.speculative_steps = Counter("medusa_speculative_steps", "Decode steps with speculative sequences, by "
                                         "tokens verified per sequence", ["nodes"], registry=r)
        self.batch_size = Histogram("medusa_batch_size", "Running sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))

    def watch_engine(self, pid: int) -> None:
        """The engine process's own process_* metrics, as medusa_engine_process_*."""
        ProcessCollector(namespace="medusa_engine", pid=lambda: pid, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
