# RabbitMQ with its management plugin for the dev overlay, from Debian's packages.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/*
# Everything the broker writes lives under /var/lib/rabbitmq (a volume): the Erlang cookie in HOME,
# the message store, logs go to the console. The configuration comes from a mounted Secret.
ENV HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=rabbit@localhost \
    RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mnesia RABBITMQ_LOG_BASE=/var/lib/rabbitmq/log RABBITMQ_LOGS=- \
    RABBITMQ_CONFIG_FILE=/etc/kubelm-rabbitmq/rabbitmq.conf \
    RABBITMQ_ENABLED_PLUGINS_FILE=/etc/kubelm-rabbitmq/enabled_plugins \
    RABBITMQ_CONF_ENV_FILE=/var/lib/rabbitmq/rabbitmq-env.conf \
    RABBITMQ_PID_FILE=/var/lib/rabbitmq/rabbitmq.pid
USER 10001
EXPOSE 5672 15672
ENTRYPOINT ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
