# Redis for the dev overlay, from Debian's package (no registry needed to build it).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER 10001
EXPOSE 6379
ENTRYPOINT ["redis-server"]
