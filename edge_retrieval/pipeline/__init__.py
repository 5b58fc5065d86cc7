"""The streaming pipeline: windows -> gate -> experts (front end + encoder) -> matcher -> detector."""
