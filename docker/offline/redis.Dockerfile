# Redis from Debian's package on the local base image: the offline stand-in for redis:7.4-alpine
# (docker-compose.offline.yml).  Bookworm's Redis is 7.0, without WAITAOF: the service then relies
# on appendfsync always, which the compose command sets, and says so in /readyz if it is missing.
ARG BASE_IMAGE=embserve-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o redis -g redis /data
USER redis
WORKDIR /data
VOLUME ["/data"]
CMD ["redis-server"]
