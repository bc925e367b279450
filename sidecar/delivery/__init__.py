"""Reply delivery: webhook outbox worker and live stream fan-out."""
