# One image for every role of a distributed prism run (learner, rollout, reward).
#
# It holds a prism binary built on the host and the libtorch libraries it loads;
# nothing is compiled or downloaded while building. scripts/docker-image
# prepares the build context (bin/prism, lib/*.so) and runs
#   docker build --build-arg BASE=<image> -t prism:latest <context>
# BASE defaults to debian:bookworm-slim; where no registry is reachable the
# script builds a local Debian base with debootstrap and passes it here.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

COPY lib/ /opt/prism/lib/
COPY bin/prism /usr/local/bin/prism
# LD_LIBRARY_PATH wins over the host paths recorded in the binary's RUNPATH.
ENV LD_LIBRARY_PATH=/opt/prism/lib \
    PRISM__RUN__DIR=/var/lib/prism/runs
# Runs as an unprivileged user (uid 10001, as the Kubernetes manifests set
# it), owning only its run folder.
RUN mkdir -p /var/lib/prism/runs && chown -R 10001:10001 /var/lib/prism
USER 10001:10001
WORKDIR /var/lib/prism
# gRPC (learner) and the health endpoints (every role).
EXPOSE 50051 8081
CMD ["prism", "--help"]
