"""Queue policies: Triton's dynamic_batching priority levels and the policy of each level's queue, as a model's
config.pbtxt states them (repository.read_config reads them), and what they make of a request's `priority` and
`timeout` parameters (the batcher, serving.batching, applies them).

- `priority_levels: N` (0: one level): levels 1..N, 1 the highest; a request's priority 0 is the
  `default_priority_level`; any other priority outside 1..N is refused (InvalidInput), where Triton would quietly
  take the default level.
- Each level's queue has a policy (`priority_queue_policy[level]`, else `default_queue_policy`): `max_queue_size`
  (exact per level: one more is Unavailable at once), `default_timeout_microseconds` (0: none),
  `allow_timeout_override` (a request's `timeout` replaces the default when it is shorter, or when the default is
  0; without it the request's timeout is ignored, as Triton ignores it) and `timeout_action` (REJECT: the request
  is answered Unavailable "Request timeout expired", Triton's code and words, the moment its time is up; DELAY: it
  stays queued and runs after the level's requests whose time is not up).
- A model whose config states no queue policy (no config.pbtxt, no dynamic_batching, or a dynamic_batching
  without default_queue_policy and priority_levels) has one level whose policy honours a request's `timeout`
  (allow_timeout_override) and REJECTs: yatdeploy's behaviour before queue policies, which packaged configs keep
  by stating allow_timeout_override.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from yatdeploy.packaging import DEFAULT_MAX_QUEUE_SIZE
from yatdeploy.serving.protocol import InvalidInput

REJECT, DELAY = "REJECT", "DELAY"
TIMEOUT_ACTIONS = (REJECT, DELAY)
# Triton's answer to a request whose queue timeout expired (its gRPC code UNAVAILABLE, HTTP 503).
TIMEOUT_EXPIRED = "Request timeout expired"
# The most priority levels a config may ask for: each is a queue of its own.
MAX_PRIORITY_LEVELS = 1024


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy: one priority level's queue."""

    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    timeout_action: str = REJECT
    default_timeout_us: int = 0
    allow_timeout_override: bool = True

    def timeout_us(self, requested_us: int) -> int:
        """How long a request may wait in this queue (0: no limit), its `timeout` parameter `requested_us`."""
        if self.allow_timeout_override and requested_us and (not self.default_timeout_us
                                                             or requested_us < self.default_timeout_us):
            return requested_us
        return self.default_timeout_us

    def as_json(self) -> dict:
        return {"timeout_action": self.timeout_action, "default_timeout_microseconds": self.default_timeout_us,
                "allow_timeout_override": self.allow_timeout_override, "max_queue_size": self.max_queue_size}


@dataclass(frozen=True)
class QueuePolicies:
    """A model's priority levels and their queues' policies (the module's docstring)."""

    default: QueuePolicy = QueuePolicy()
    priority_levels: int = 0
    default_priority_level: int = 0
    by_level: dict[int, QueuePolicy] = field(default_factory=dict)  # priority_queue_policy

    def levels(self) -> list[int]:
        """The queues' levels, the highest priority first: [0] without priority levels, else 1..N."""
        return list(range(1, self.priority_levels + 1)) if self.priority_levels else [0]

    def level(self, priority: int, model: str) -> int:
        """The level of a request's `priority` parameter (0: the default); InvalidInput for one outside the levels."""
        if priority == 0:
            return self.default_priority_level
        if not self.priority_levels:
            raise InvalidInput(f"the request's 'priority' parameter asks for request priorities ({priority}), "
                               f"which model '{model}' does not have (its config states no dynamic_batching "
                               "priority_levels)")
        if priority > self.priority_levels:
            raise InvalidInput(f"the request's 'priority' parameter {priority} is not a priority level of model "
                               f"'{model}': 1 (highest) to {self.priority_levels}, or 0 for the default level "
                               f"{self.default_priority_level}")
        return priority

    def policy(self, level: int) -> QueuePolicy:
        return self.by_level.get(level, self.default)

    def with_max_queue_size(self, size: int) -> QueuePolicies:
        """These policies with every level's max_queue_size `size` (the server's --max-queue-size)."""
        return replace(self, default=replace(self.default, max_queue_size=size),
                       by_level={level: replace(p, max_queue_size=size) for level, p in self.by_level.items()})

    def as_json(self) -> dict:
        """The dynamic_batching fields these are, in Triton's JSON form of a model config."""
        return {"priority_levels": self.priority_levels, "default_priority_level": self.default_priority_level,
                "default_queue_policy": self.default.as_json(),
                "priority_queue_policy": {str(level): p.as_json() for level, p in sorted(self.by_level.items())}}
