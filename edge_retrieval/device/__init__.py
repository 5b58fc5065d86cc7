"""The device side: capture (sources, ring buffer), the daemon around the pipeline, and delivery
(sinks, clips, on-disk outboxes, the MQTT agent, systemd notification)."""
