# Prometheus from Debian's package on the local base image: the offline stand-in for
# prom/prometheus (docker-compose.offline.yml).  Same entrypoint and working folder as the
# official image, so the compose file's command works unchanged.
ARG BASE_IMAGE=embserve-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o prometheus -g prometheus /prometheus
USER prometheus
WORKDIR /prometheus
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml"]
