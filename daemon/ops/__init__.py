"""Operations: metrics, HTTP listener (health, readiness, preview), systemd notify, GPU metrics."""
