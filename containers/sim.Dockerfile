# A local stand-in for vllm/vllm-openai: the sim engine (stdlib only) on a minimal Debian with python3.
FROM smartswitch-sim-base:bookworm
WORKDIR /app
COPY dashboard/__init__.py dashboard/__init__.py
COPY dashboard/engines/__init__.py dashboard/engines/__init__.py
COPY dashboard/engines/sim.py dashboard/engines/sim.py
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["python3", "-m", "dashboard.engines.sim"]
