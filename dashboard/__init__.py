"""smartswitch: switch a lab GPU box between vLLM models, with real progress and a dashboard."""
