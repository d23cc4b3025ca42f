#!/usr/bin/env bash
# Build offramp's cpu image with podman on a machine that cannot pull base images and cannot
# `podman run`, then start the server from the built image's filesystem and check it answers.
#
#   docker/build-local.sh            # all three steps: base, build, run
#   docker/build-local.sh base       # (a) only the debootstrapped Debian bookworm base image
#   docker/build-local.sh build      # (b) only the cpu target (needs the base)
#   docker/build-local.sh run        # (c) only the smoke test of the built image
#
# What it needs: root, podman/buildah (`podman build --isolation chroot`), debootstrap, unshare,
# chroot, curl, python3 on the host; Debian's archive (DEBIAN_MIRROR) and PyPI reachable; the
# torch 2.13.0+cpu wheel in WHEELS (download.pytorch.org need not be reachable).
#
# (a) base: `debootstrap --variant=minbase` of Debian bookworm (Python 3.11, like python:3.11-slim)
#     with python3, python3-venv, python3-pip and ca-certificates (passwd, for groupadd/useradd,
#     is in minbase), imported as BASE_IMAGE. Skipped when that image exists.
# (b) build: `podman build --target cpu` with PYTHON_IMAGE=BASE_IMAGE. The demo stage takes torch
#     from WHEELS (bind-mounted at /mnt, TORCH_FIND_LINKS=/mnt, TORCH_INDEX_URL empty); a
#     dry-run resolution on the host first makes sure that pip picks that wheel and no CUDA
#     packages. The host's CA bundle is bind-mounted over the image's for the build only (PyPI is
#     reached through a TLS-intercepting proxy here); nothing of it stays in the image.
# (c) run: `podman image mount`, then in a private mount namespace: the image's root bind-mounted
#     read-only (as the Kubernetes manifests run it: readOnlyRootFilesystem), /proc, a minimal
#     /dev, and tmpfs on /tmp and on the state and cache directories; the server runs there with
#     `chroot --userspec` as the image's user, with the image's environment only (`env -i`, plus
#     HOME from the image's /etc/passwd, as Docker adds it), working directory and entrypoint, on
#     127.0.0.1 and a free port. It waits for readiness, sends one V2 inference request to the demo
#     model, reads /metrics, stops the server by its pid and unmounts the image. The image itself
#     is not modified. (`podman run` is not used: here crun cannot set rlimits.)
#
# Settings, from the environment: WORK (scratch directory), BASE_IMAGE, IMAGE, DEBIAN_MIRROR,
# SUITE, CA_BUNDLE, WHEELS, TORCH_VERSION, READY_TIMEOUT, HOST_PYTHON (defaults below).
# Exit status: 0 when every step passed, non-zero otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/offramp-image}                      # scratch: rootfs, logs (outside the repo)
BASE_IMAGE=${BASE_IMAGE:-localhost/offramp-base:bookworm}
IMAGE=${IMAGE:-localhost/offramp:cpu}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEELS=${WHEELS:-/opt/wheels}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}                # what the demo stage must install
READY_TIMEOUT=${READY_TIMEOUT:-120}                       # seconds to wait for /v2/health/ready
HOST_PYTHON=${HOST_PYTHON:-python3}                       # the host's Python 3 (3.11: same wheels)

STEP=${1:-all}
case "$STEP" in all | base | build | run) ;; *) echo "usage: $0 [all|base|build|run]" >&2; exit 2 ;; esac

log() { printf '[build-local %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[build-local] FAILED: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (podman image mount, chroot and unshare need it)"
for tool in podman debootstrap unshare chroot curl "$HOST_PYTHON"; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
mkdir -p "$WORK"

# -------------------------------------------------------------------------------------- (a) base
make_base() {
    if podman image exists "$BASE_IMAGE"; then
        log "base: $BASE_IMAGE exists, debootstrap skipped (podman rmi $BASE_IMAGE to redo it)"
        return
    fi
    local rootfs="$WORK/rootfs" start=$SECONDS
    rm -rf "$rootfs" "$WORK/rootfs.tar"
    log "base: debootstrap $SUITE (minbase) from $DEBIAN_MIRROR into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap (log: $WORK/debootstrap.log)"; }
    # What the Dockerfile's RUN steps call must be there.
    for exe in python3 groupadd useradd chown mkdir rm env; do
        chroot "$rootfs" /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin sh -c "command -v $exe" >/dev/null \
            || die "base: $exe missing from the debootstrapped root"
    done
    chroot "$rootfs" python3 -c 'import ensurepip, venv' || die "base: python3 -m venv would not work"
    # Package caches and lists are not needed in an image (apt-get update restores the lists).
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    : >"$rootfs/etc/resolv.conf"  # the host's; podman provides one to each RUN
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$WORK/rootfs.tar" .
    # No ENV in a tarball: give PATH (the Dockerfile's `PATH=/opt/venv/bin:$PATH` extends it) and LANG.
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE + python3 python3-venv python3-pip ca-certificates" \
        "$WORK/rootfs.tar" "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$WORK/rootfs.tar"
    log "base: $BASE_IMAGE imported in $((SECONDS - start)) s ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
}

# ------------------------------------------------------------------------------------- (b) build
# The demo stage's install, resolved on the host without installing: torch must be the local CPU
# wheel and nothing CUDA may come along (PyPI's torch would pull gigabytes of nvidia-* packages).
# --isolated: the host's pip configuration (its extra indexes, constraints) does not apply.
check_torch_resolution() {
    local report="$WORK/demo-resolution.json"
    log "build: resolving the demo stage's install (dry run, torch from $WHEELS)"
    (cd "$ROOT" && "$HOST_PYTHON" -m pip --isolated --disable-pip-version-check install --dry-run --ignore-installed --quiet \
        --cert "$CA_BUNDLE" --find-links "$WHEELS" -c constraints.txt --report "$report" '.[cpu,export]') \
        >"$WORK/demo-resolution.log" 2>&1 || { cat "$WORK/demo-resolution.log" >&2; die "dry-run resolution"; }
    "$HOST_PYTHON" - "$report" "$TORCH_VERSION" <<'EOF' || die "the demo stage would not install torch $TORCH_VERSION alone"
import json, sys
report, want = json.load(open(sys.argv[1])), sys.argv[2]
names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
cuda = sorted(n for n in names if n.startswith(("nvidia-", "triton", "cuda-")))
print(f"[build-local] demo stage: {len(names)} distributions, torch {names.get('torch')}, CUDA packages: {cuda or 'none'}")
sys.exit(0 if names.get("torch") == want and not cuda else 1)
EOF
}

build_image() {
    podman image exists "$BASE_IMAGE" || die "no $BASE_IMAGE: run '$0 base' first"
    compgen -G "$WHEELS/torch-$TORCH_VERSION-*.whl" >/dev/null || die "no torch $TORCH_VERSION wheel in $WHEELS"
    [[ -f $CA_BUNDLE ]] || die "no CA bundle at $CA_BUNDLE"
    check_torch_resolution
    local start=$SECONDS
    log "build: podman build --target cpu -> $IMAGE (log: $WORK/build.log)"
    # --pull=never: the base is local and nothing can be pulled. Layers are cached: a second run
    # with unchanged sources takes seconds. Bind mounts only over paths the base already has (a new
    # mount point would stay in the image as an empty file or directory): the CA bundle over the
    # image's own, the wheels on the empty /mnt.
    if ! podman build --isolation chroot --pull=never --target cpu \
        --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_INDEX_URL= \
        --build-arg TORCH_FIND_LINKS=/mnt \
        --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
        --volume "$WHEELS:/mnt:ro" \
        --tag "$IMAGE" --file "$ROOT/Dockerfile" "$ROOT" >"$WORK/build.log" 2>&1; then
        tail -n 40 "$WORK/build.log" >&2
        die "podman build (log: $WORK/build.log)"
    fi
    BUILD_SECONDS=$((SECONDS - start))
    # The guard once more, on what pip really fetched: nvidia-*, triton (not tritonclient), PyPI's torch.
    if grep -E -q 'Downloading (nvidia[-_]|triton-|torch-[0-9.]+-)' "$WORK/build.log"; then
        die "the build downloaded CUDA packages or PyPI's torch (see $WORK/build.log)"
    fi
    grep -E 'check_runtime: ok|^bundle ' "$WORK/build.log" | sed 's/^/[build-local]   /' || true
    log "build: $IMAGE built in $BUILD_SECONDS s"
    podman images --filter reference="$IMAGE" --filter reference="$BASE_IMAGE"
}

# --------------------------------------------------------------------------------------- (c) run
SERVER_PID=
MOUNTED=
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n $MOUNTED ]]; then podman image unmount "$IMAGE" >/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap stops the server and unmounts on ^C too

run_image() {
    podman image exists "$IMAGE" || die "no $IMAGE: run '$0 build' first"
    local mnt port config serve_log="$WORK/serve.log" base
    mnt=$(podman image mount "$IMAGE")
    MOUNTED=1
    # The image's configuration: environment, user, working directory, entrypoint and command.
    config=$(podman image inspect "$IMAGE")
    local -a env argv
    mapfile -t env < <("$HOST_PYTHON" -c 'import json,sys; [print(e) for e in json.load(sys.stdin)[0]["Config"]["Env"]]' <<<"$config")
    mapfile -t argv < <("$HOST_PYTHON" -c 'import json,sys; c=json.load(sys.stdin)[0]["Config"]; [print(a) for a in (c.get("Entrypoint") or []) + (c.get("Cmd") or [])]' <<<"$config")
    local user workdir
    user=$("$HOST_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)[0]["Config"].get("User") or "0:0")' <<<"$config")
    workdir=$("$HOST_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)[0]["Config"].get("WorkingDir") or "/")' <<<"$config")
    [[ $user == *:* ]] || user="$user:$user"
    [[ ${user%%:*} != 0 ]] || die "the image runs as root"
    port=$("$HOST_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    base="http://127.0.0.1:$port"
    log "run: $IMAGE mounted at $mnt; ${argv[*]} as $user in $workdir on 127.0.0.1:$port"

    # A private mount namespace: what is mounted here goes away with the server. The image's root is
    # read-only; the server writes only to the tmpfs mounts. `exec` all the way: $! is the server.
    local uid=${user%%:*} gid=${user##*:} state cache
    state=$(printf '%s\n' "${env[@]}" | sed -n 's/^OFFRAMP_STATE_DIR=//p')
    cache=$(printf '%s\n' "${env[@]}" | sed -n 's/^OFFRAMP_CACHE_DIR=//p')
    # HOME as Docker sets it when the image does not: the user's home in the image's /etc/passwd.
    if ! printf '%s\n' "${env[@]}" | grep -q '^HOME='; then
        env+=("HOME=$(awk -F: -v uid="$uid" '$3 == uid { print $6 }' "$mnt/etc/passwd")")
    fi
    # shellcheck disable=SC2016  # expanded by the inner shell
    unshare --mount --propagation private -- /bin/sh -c '
        set -e
        root=$1 uid=$2 gid=$3 state=$4 cache=$5 workdir=$6 user=$7; shift 7
        mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
        mount -t proc proc "$root/proc"
        # A minimal /dev, as a container runtime gives: a few devices bound from the host, /dev/shm.
        mount -t tmpfs -o mode=0755,size=64k tmpfs "$root/dev"
        for dev in null zero full random urandom tty; do
            : >"$root/dev/$dev" && mount --bind "/dev/$dev" "$root/dev/$dev"
        done
        mkdir "$root/dev/shm" && mount -t tmpfs -o mode=1777,size=64m tmpfs "$root/dev/shm"
        ln -s /proc/self/fd "$root/dev/fd"
        ln -s /proc/self/fd/0 "$root/dev/stdin" && ln -s /proc/self/fd/1 "$root/dev/stdout" && ln -s /proc/self/fd/2 "$root/dev/stderr"
        mount -t tmpfs -o mode=1777,size=256m tmpfs "$root/tmp"
        for dir in $state $cache; do
            mount -t tmpfs -o "uid=$uid,gid=$gid,mode=0750,size=256m" tmpfs "$root$dir"
        done
        exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$workdir" "$@"
    ' sh "$mnt" "$uid" "$gid" "$state" "$cache" "$workdir" "$user" \
        "${env[@]}" "${argv[@]}" --host 127.0.0.1 --port "$port" >"$serve_log" 2>&1 &
    SERVER_PID=$!

    local start=$SECONDS waited
    until curl -sf --max-time 2 "$base/v2/health/ready" >/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 30 "$serve_log" >&2
            die "the server exited before it was ready (log: $serve_log)"
        fi
        ((SECONDS - start < READY_TIMEOUT)) || { tail -n 30 "$serve_log" >&2; die "not ready after $READY_TIMEOUT s"; }
        sleep 1
    done
    waited=$((SECONDS - start))
    log "run: ready after ${waited} s: $(curl -sf "$base/v2/health/ready")"
    log "run: server process: $(tr '\0' ' ' </proc/"$SERVER_PID"/cmdline | cut -c1-80); $(grep -E '^(Uid|Groups):' /proc/"$SERVER_PID"/status | tr -s '\t ' ' ' | paste -sd ';')"

    # The demo bundle's model is named by its manifest (the demo: digits-vit).
    local model request answer
    model=$("$HOST_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$mnt/bundles/demo/manifest.json")
    local metadata
    metadata=$(curl -sf "$base/v2/models/$model") || die "GET /v2/models/$model"
    # One sample of zeros, shaped and typed as the model's first input says (-1: batch of 1).
    request=$("$HOST_PYTHON" -c '
import json, math, sys
meta = json.loads(sys.argv[1])
inp = meta["inputs"][0]
shape = [1 if d < 0 else d for d in inp["shape"]]
data = [0] * math.prod(shape)
print(json.dumps({"id": "build-local", "inputs": [{"name": inp["name"], "datatype": inp["datatype"], "shape": shape, "data": data}]}))
' "$metadata")
    log "run: model $model, input $("$HOST_PYTHON" -c 'import json,sys; i=json.loads(sys.argv[1])["inputs"][0]; print(i["name"], i["datatype"], i["shape"])' "$metadata")"
    answer=$(curl -sf -H 'Content-Type: application/json' -d "$request" "$base/v2/models/$model/infer") \
        || die "POST /v2/models/$model/infer"
    "$HOST_PYTHON" - "$answer" <<'EOF' || die "the inference answer has no outputs: $answer"
import json, sys
answer = json.loads(sys.argv[1])
outputs = answer.get("outputs") or []
assert outputs, "no outputs"
for out in outputs:
    data = out["data"] if len(out["data"]) <= 4 else [round(x, 4) for x in out["data"][:4]] + ["..."]
    name, kind, shape = out["name"], out["datatype"], out["shape"]
    print(f"[build-local]   output {name} {kind} {shape}: {data}")
EOF

    local metrics count
    metrics=$(curl -sf "$base/metrics") || die "GET /metrics"
    count=$(grep -c '^offramp_' <<<"$metrics" || true)
    ((count > 0)) || die "/metrics has no offramp_ samples"
    log "run: /metrics: $count offramp_ samples, e.g."
    grep -E '^offramp_(requests_total|exit_stage_total|compute_fraction)' <<<"$metrics" | head -n 4 | sed 's/^/[build-local]   /'

    # Stop: SIGTERM drains (readiness 503 for drain_grace_s), a second one skips the grace.
    kill -TERM "$SERVER_PID"
    sleep 1
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local code=0
    wait "$SERVER_PID" || code=$?
    SERVER_PID=
    ((code == 0)) || { tail -n 20 "$serve_log" >&2; die "the server exited with status $code"; }
    podman image unmount "$IMAGE" >/dev/null
    MOUNTED=
    log "run: server stopped (exit 0), image unmounted; server log: $serve_log"
    RUN_SUMMARY="ready in ${waited} s, $model answered with ${#answer} bytes of outputs, $count offramp_ metric samples"
}

BUILD_SECONDS=
RUN_SUMMARY=
total=$SECONDS
if [[ $STEP == all || $STEP == base ]]; then make_base; fi
if [[ $STEP == all || $STEP == build ]]; then build_image; fi
if [[ $STEP == all || $STEP == run ]]; then run_image; fi
log "summary: step $STEP passed in $((SECONDS - total)) s${BUILD_SECONDS:+; build ${BUILD_SECONDS} s}${RUN_SUMMARY:+; $RUN_SUMMARY}"
if podman image exists "$IMAGE"; then
    log "summary: $(podman images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' "$IMAGE")"
fi
