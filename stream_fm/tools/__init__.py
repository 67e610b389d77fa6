"""What runs around the product: the broker launcher, the simulator, the demo, the
benchmarks, the Prometheus launcher and the dashboard renderer. The worker never imports it."""
