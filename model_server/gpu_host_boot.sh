#!/usr/bin/env bash
# chipscale GPU host boot: TorchServe as a systemd service, GPU metrics to CloudWatch, and the
# Auto Scaling launch lifecycle action completed only once every TorchServe worker is READY.
#
# Run as root by the launch template's user data on a Deep Learning AMI (Amazon Linux 2023 or
# Ubuntu; the NVIDIA driver is already there), with the CHIPSCALE_* variables below exported.
# The instance waits in Pending:Wait (lifecycle hook chipscale.names.LIFECYCLE_HOOK_LAUNCH)
# until this script says CONTINUE: the load balancer's health check reads TorchServe's /ping,
# which answers healthy before the workers have loaded the model, so without the hook new
# instances would take traffic they cannot serve. On any failure the action is ABANDONed with
# the reason in the log, and Auto Scaling replaces the instance: as soon as the region, the
# group and the hook are known (a bad variable abandons too), and at CHIPSCALE_BOOT_DEADLINE at
# the latest, before the hook's own timeout would keep the GPU billing for nothing. The first
# step is one HEAD of the model archive: a missing one abandons before any install, its reason
# written to CHIPSCALE_LOG_GROUP directly. The CloudWatch agent starts before the installs and
# ships this output (/var/log/cloud-init-output.log) and TorchServe's logs to
# CHIPSCALE_LOG_GROUP, so a failed boot is readable after the instance is gone.
#
# Usage:
#   gpu_host_boot.sh                the whole boot (needs every variable below, root)
#   gpu_host_boot.sh wait-ready     only wait until CHIPSCALE_MODEL_NAME's workers are all
#                                   READY on CHIPSCALE_MANAGEMENT_URL (used by the tests)
#   gpu_host_boot.sh scale-workers  wait for TorchServe to know CHIPSCALE_MODEL_NAME, then scale
#                                   it to CHIPSCALE_WORKERS workers: the unit's ExecStartPost,
#                                   so a TorchServe restarted by systemd gets its workers back
#
# Environment (exported by the stack's user data):
#   CHIPSCALE_REGION            AWS region
#   CHIPSCALE_MODEL_BUCKET      bucket holding the model archive
#   CHIPSCALE_MODEL_KEY         S3 key of the .mar
#   CHIPSCALE_MODEL_NAME        TorchServe model name (the name the worker Lambda calls)
#   CHIPSCALE_WORKERS_PER_GPU   TorchServe workers per GPU
#   CHIPSCALE_ASG_NAME          Auto Scaling group of this instance
#   CHIPSCALE_LIFECYCLE_HOOK    launch lifecycle hook holding this instance in Pending:Wait
#   CHIPSCALE_CW_NAMESPACE      CloudWatch namespace of the GPU metrics
#   CHIPSCALE_LOG_GROUP         CloudWatch Logs group the agent ships the boot and TorchServe
#                               logs to
#   CHIPSCALE_DRAIN_HOOK        termination lifecycle hook the drain watcher completes
#                               (gpu_host_drain.sh; default chipscale-drain)
#   CHIPSCALE_DRAIN_TIMEOUT     seconds it waits for requests in flight first (default 120)
#   CHIPSCALE_BOOT_DEADLINE     optional epoch second by which the lifecycle action must be
#                               completed (the user data sets it: kernel start + the hook's
#                               timeout - a margin); past it the boot ABANDONs
#   CHIPSCALE_WHEELHOUSE_URI    optional s3:// prefix of wheels (`chipscale wheelhouse build`);
#                               its wheelhouse.json names torch, its CUDA, the driver that CUDA
#                               needs and the wheels' Python; empty: PyPI through the NAT
#   CHIPSCALE_TORCH_VERSION     torch the model was exported with (default 2.13.0)
#   CHIPSCALE_MIN_DRIVER        lowest NVIDIA driver PyPI's build of that torch runs on (empty:
#                               unknown); with a wheelhouse its manifest's value counts. An older
#                               driver abandons the launch before anything is installed
# Tuning (optional):
#   CHIPSCALE_MANAGEMENT_URL    TorchServe management API (default http://127.0.0.1:8081)
#   CHIPSCALE_READY_TIMEOUT     seconds to wait for READY workers (default: until the boot
#                               deadline; 900 without one)
#   CHIPSCALE_READY_POLL        seconds between readiness polls (default 5)
#   CHIPSCALE_REGISTER_TIMEOUT  seconds to wait for TorchServe to register the model (600)
#   CHIPSCALE_EXPECTED_WORKERS  wait-ready only: workers that must be READY (default 1)
#   CHIPSCALE_WORKERS           scale-workers only: the worker count (the boot writes it to
#                               the unit's environment file: WORKERS_PER_GPU x GPUs)
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) fails the assignment, as it would inline

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
# Overridable only so the tests can install into a temporary folder.
readonly PREFIX=${CHIPSCALE_PREFIX:-/opt/chipscale}
readonly VENV=$PREFIX/venv
readonly MODEL_STORE=$PREFIX/model-store
readonly WHEELHOUSE=$PREFIX/wheelhouse
readonly ENV_FILE=/etc/chipscale/torchserve.env
readonly UNIT=chipscale-torchserve.service
readonly DRAIN_UNIT=chipscale-drain.service
readonly DRAIN_ENV_FILE=/etc/chipscale/drain.env
readonly SERVICE_USER=chipscale
readonly TORCHSERVE_VERSION=0.12.0
readonly CW_AGENT_DIR=/opt/aws/amazon-cloudwatch-agent
readonly CW_NAMESPACE_PLACEHOLDER=__CHIPSCALE_CW_NAMESPACE__
readonly LOG_GROUP_PLACEHOLDER=__CHIPSCALE_LOG_GROUP__
# Overridable only so the tests can serve it on loopback.
readonly IMDS=${CHIPSCALE_IMDS_URL:-http://169.254.169.254/latest}

readonly REQUIRED_VARS=(
  CHIPSCALE_REGION CHIPSCALE_MODEL_BUCKET CHIPSCALE_MODEL_KEY CHIPSCALE_MODEL_NAME
  CHIPSCALE_WORKERS_PER_GPU CHIPSCALE_ASG_NAME CHIPSCALE_LIFECYCLE_HOOK CHIPSCALE_CW_NAMESPACE
  CHIPSCALE_LOG_GROUP
)

MANAGEMENT_URL=${CHIPSCALE_MANAGEMENT_URL:-http://127.0.0.1:8081}
READY_TIMEOUT=${CHIPSCALE_READY_TIMEOUT:-}
# Without a boot deadline or CHIPSCALE_READY_TIMEOUT, the readiness wait gives up after this.
readonly DEFAULT_READY_TIMEOUT=900
READY_POLL=${CHIPSCALE_READY_POLL:-5}
REGISTER_TIMEOUT=${CHIPSCALE_REGISTER_TIMEOUT:-600}
# The scaling PUT waits for the workers to start; the unit's TimeoutStartSec (1200) bounds
# registration + scaling, so both stay below it.
readonly SCALE_TIMEOUT=300

# Set while the full boot runs: the step in progress (for the failure message) and whether the
# lifecycle action has been completed (so the exit trap abandons it at most once), and the
# deadline watchdog's pid.
STEP="starting"
LIFECYCLE_DONE=false
WATCHDOG_PID=""
# Once the CloudWatch agent runs, an abandoning boot waits this long first: twice the agent's
# force_flush_interval, so the failure reaches CloudWatch Logs before the instance is gone.
AGENT_STARTED=false
readonly LOG_FLUSH_SECONDS=10

# Reads TorchServe's `GET /models/NAME` answer on stdin; prints a one-line summary and exits 0
# only when there is at least argv[1] workers and every one of them is READY.
# shellcheck disable=SC2016  # Python source, not a shell expansion
readonly WORKERS_READY_PY='
import json, sys
expected = int(sys.argv[1])
try:
    versions = json.load(sys.stdin)
except ValueError:
    print("management API answered something that is not JSON")
    sys.exit(1)
if isinstance(versions, dict):
    versions = [versions]
workers = [w for v in versions for w in v.get("workers", [])]
ready = sum(1 for w in workers if w.get("status") == "READY")
states = ", ".join(sorted({str(w.get("status")) for w in workers})) or "none"
print(f"{ready}/{len(workers)} workers READY, {expected} wanted (states: {states})")
sys.exit(0 if workers and ready == len(workers) and ready >= expected else 1)
'

# ------------------------------------------------------------------------------- helpers

log() { printf '%s chipscale-boot: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

die() {
  log "error: $*"
  exit 1
}

usage_error() {
  log "error: $*"
  exit 2
}

# Enter the next step of the boot; refuse to start one once the boot deadline has passed.
step() {
  if (($(seconds_left) <= 0)); then
    die "boot deadline passed (epoch $CHIPSCALE_BOOT_DEADLINE) after ${STEP}, before: $*"
  fi
  STEP=$*
  log "$STEP"
}

# Seconds until CHIPSCALE_BOOT_DEADLINE (negative once past; a large number without one).
seconds_left() {
  if [[ -z ${CHIPSCALE_BOOT_DEADLINE:-} ]]; then
    echo 999999999
  else
    echo $((CHIPSCALE_BOOT_DEADLINE - $(date +%s)))
  fi
}

# Every variable named must be set and non-empty; all missing ones are named at once.
require_env() {
  local name missing=()
  for name in "$@"; do
    [[ -n ${!name:-} ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    usage_error "missing environment variable(s): ${missing[*]} (the stack's user data exports them)"
  fi
}

require_positive_int() {
  local name=$1
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || usage_error "$name must be a positive integer, got '${!name}'"
}

# Values that end up in URLs, file names, sed and systemd files: refuse anything unusual.
validate_env() {
  require_positive_int CHIPSCALE_WORKERS_PER_GPU
  [[ $CHIPSCALE_MODEL_NAME =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] ||
    usage_error "CHIPSCALE_MODEL_NAME may hold only letters, digits, '_', '.' and '-', got '$CHIPSCALE_MODEL_NAME'"
  [[ $CHIPSCALE_CW_NAMESPACE =~ ^[A-Za-z0-9._/#:\ -]+$ ]] ||
    usage_error "CHIPSCALE_CW_NAMESPACE is not a CloudWatch namespace: '$CHIPSCALE_CW_NAMESPACE'"
  [[ $CHIPSCALE_TORCH_VERSION =~ ^[0-9]+(\.[0-9]+)*([+.a-z0-9]*)$ ]] ||
    usage_error "CHIPSCALE_TORCH_VERSION is not a version: '$CHIPSCALE_TORCH_VERSION'"
  [[ ${CHIPSCALE_MIN_DRIVER:-} =~ ^([0-9]+(\.[0-9]+)*)?$ ]] ||
    usage_error "CHIPSCALE_MIN_DRIVER must be empty or a driver version such as 580, got '$CHIPSCALE_MIN_DRIVER'"
  [[ -z $CHIPSCALE_WHEELHOUSE_URI || $CHIPSCALE_WHEELHOUSE_URI == s3://* ]] ||
    usage_error "CHIPSCALE_WHEELHOUSE_URI must be empty or an s3:// prefix, got '$CHIPSCALE_WHEELHOUSE_URI'"
  [[ $CHIPSCALE_LOG_GROUP =~ ^[A-Za-z0-9._/#-]+$ ]] ||
    usage_error "CHIPSCALE_LOG_GROUP is not a CloudWatch Logs group name: '$CHIPSCALE_LOG_GROUP'"
  [[ -z $READY_TIMEOUT || $READY_TIMEOUT =~ ^[0-9]+$ ]] ||
    usage_error "CHIPSCALE_READY_TIMEOUT must be whole seconds"
  [[ -z ${CHIPSCALE_BOOT_DEADLINE:-} || $CHIPSCALE_BOOT_DEADLINE =~ ^[0-9]+$ ]] ||
    usage_error "CHIPSCALE_BOOT_DEADLINE must be epoch seconds, got '$CHIPSCALE_BOOT_DEADLINE'"
}

require_cmd() {
  local cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null || die "'$cmd' is not installed; is this a Deep Learning AMI?"
  done
}

# dnf (Amazon Linux 2023) or apt (Ubuntu), set once by detect_package_manager.
PKG=""
detect_package_manager() {
  if command -v dnf >/dev/null; then
    PKG=dnf
  elif command -v apt-get >/dev/null; then
    PKG=apt
  else
    die "neither dnf nor apt-get found: only Amazon Linux 2023 and Ubuntu AMIs are supported"
  fi
}

APT_UPDATED=false
install_packages() {
  case $PKG in
    dnf) dnf install -y -q "$@" ;;
    apt)
      if [[ $APT_UPDATED == false ]]; then
        apt-get update -q
        APT_UPDATED=true
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
      ;;
    *) die "no package manager detected" ;;
  esac
}

# IMDSv2 only (the launch template forbids v1): a session token, then the path.
imds() {
  local token
  token=$(curl -fsS --max-time 5 -X PUT "$IMDS/api/token" \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
  curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$IMDS/meta-data/$1"
}

# ------------------------------------------------------------------------------- steps

# Java 17 or newer for TorchServe's frontend; prints JAVA_HOME.
ensure_java() {
  local java major
  java=$(command -v java || true)
  if [[ -n $java ]]; then
    # awk reads to the end (no early exit) so java never meets a closed pipe under pipefail.
    major=$("$java" -version 2>&1 | awk -F'"' '!done && /version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); done = 1}')
    if ((${major:-0} >= 17)); then
      dirname "$(dirname "$(readlink -f "$java")")"
      return
    fi
  fi
  if [[ $PKG == dnf ]]; then
    install_packages java-17-amazon-corretto-headless >&2
  else
    install_packages openjdk-17-jre-headless >&2
  fi
  # Another Java may stay the default `java`: point TorchServe at 17 explicitly.
  for java in /usr/lib/jvm/java-17-*/bin/java; do
    [[ -x $java ]] && dirname "$(dirname "$java")" && return
  done
  die "Java 17 was installed but not found under /usr/lib/jvm"
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

# A Python 3.10+ for the venv (torch 2.13 needs it; Amazon Linux 2023's python3 is 3.9): the
# version given (the wheelhouse's), or the newest found.
ensure_python() {
  local candidate wanted=${1:-}
  if [[ -n $wanted ]]; then
    if ! command -v "python$wanted" >/dev/null; then
      [[ $PKG == dnf ]] || die "no python$wanted (the wheelhouse's) on this Ubuntu image"
      install_packages "python$wanted" "python$wanted-pip" >&2
    fi
    command -v "python$wanted"
    return
  fi
  for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null && python_ok "$candidate"; then
      command -v "$candidate"
      return
    fi
  done
  [[ $PKG == dnf ]] || die "no Python 3.10 or newer on this Ubuntu image"
  install_packages python3.11 python3.11-pip >&2
  command -v python3.11
}

# The venv with the exact torch the model was exported with (a CUDA build: the default Linux
# wheels on PyPI), TorchServe, its undeclared pyyaml, and nvgpu for its GPU metrics.
create_venv() {
  local python=$1 pip_args=(--quiet --no-cache-dir --disable-pip-version-check --no-input)
  if [[ $PKG == apt ]]; then # Ubuntu ships venv's ensurepip separately
    install_packages "$(basename "$(readlink -f "$python")")-venv" >&2
  fi
  "$python" -m venv "$VENV"
  if [[ -n $CHIPSCALE_WHEELHOUSE_URI ]]; then # S3 through the gateway endpoint, not PyPI
    aws s3 sync --only-show-errors "${CHIPSCALE_WHEELHOUSE_URI%/}/" "$WHEELHOUSE/"
    pip_args+=(--no-index --find-links "$WHEELHOUSE")
  fi
  "$VENV/bin/pip" install "${pip_args[@]}" \
    "torch==$CHIPSCALE_TORCH_VERSION" \
    "torchserve==$TORCHSERVE_VERSION" "torch-model-archiver==$TORCHSERVE_VERSION" \
    pyyaml nvgpu
  "$VENV/bin/python" - "$CHIPSCALE_TORCH_VERSION" <<'EOF' || die "torch in $VENV cannot use the GPUs (a CPU-only wheel, or a driver older than its CUDA)"
import sys
import torch

want = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
sys.exit(0 if torch.__version__.split("+")[0] == want and torch.cuda.is_available() else 1)
EOF
}

# One HEAD of the model archive, before anything is installed: a missing archive abandons the
# launch in seconds, naming its key, not after minutes of GPU time and gigabytes of installs.
# The host role may list models/, so a missing key answers 404 rather than 403.
check_model_archive() {
  local uri="s3://$CHIPSCALE_MODEL_BUCKET/$CHIPSCALE_MODEL_KEY" answer reason
  if answer=$(aws s3api head-object --region "$CHIPSCALE_REGION" \
    --bucket "$CHIPSCALE_MODEL_BUCKET" --key "$CHIPSCALE_MODEL_KEY" \
    --query ContentLength --output text 2>&1); then
    log "model archive $uri: $answer bytes"
    return 0
  fi
  case $answer in
    *"(404)"* | *NoSuchKey* | *"Not Found"*)
      reason="model archive $uri does not exist (404): upload it to that key or deploy with -c modelArchive=PATH (docs/deploy.md, \"The model archive\")"
      ;;
    *"(403)"* | *AccessDenied* | *Forbidden*)
      reason="model archive $uri: access denied (403): the host role reads and lists models/ of the model bucket only"
      ;;
    *) reason="model archive $uri could not be read: ${answer//$'\n'/ }" ;;
  esac
  log_to_host_logs "abandoning the launch: $reason"
  die "$reason"
}

# One line straight into this instance's boot log stream, for a failure before the CloudWatch
# agent runs (it would ship it there); best effort.
log_to_host_logs() {
  local stream events
  stream="$(imds instance-id)/cloud-init-output.log" || return 0
  events=$(python3 -c 'import json, sys, time
print(json.dumps([{"timestamp": int(time.time() * 1000), "message": sys.argv[1]}]))' "$*") ||
    return 0
  aws logs create-log-stream --region "$CHIPSCALE_REGION" \
    --log-group-name "$CHIPSCALE_LOG_GROUP" --log-stream-name "$stream" >/dev/null 2>&1 || true
  aws logs put-log-events --region "$CHIPSCALE_REGION" --log-group-name "$CHIPSCALE_LOG_GROUP" \
    --log-stream-name "$stream" --log-events "$events" >/dev/null 2>&1 ||
    log "could not write to $CHIPSCALE_LOG_GROUP"
}

# Set by check_torch_driver from the wheelhouse's manifest (empty without a wheelhouse).
WHEEL_TORCH="" WHEEL_CUDA="" WHEEL_PYTHON="" WHEEL_MIN_DRIVER=""

# Abandon with a reason that reaches the host log group even before the agent runs.
refuse() {
  log_to_host_logs "abandoning the launch: $*"
  die "$*"
}

# The wheelhouse's manifest (written last by `chipscale wheelhouse build`): one small GET.
read_wheelhouse_manifest() {
  local uri=${CHIPSCALE_WHEELHOUSE_URI%/}/wheelhouse.json stack=${CHIPSCALE_ASG_NAME%-gpu-fleet}
  local answer fields
  install -d -m 0755 "$WHEELHOUSE"
  answer=$(aws s3 cp --only-show-errors "$uri" "$WHEELHOUSE/wheelhouse.json" 2>&1) ||
    refuse "wheelhouse manifest $uri is missing or unreadable (${answer//$'\n'/ }): build it with \`chipscale wheelhouse build --stack $stack\`, or deploy with -c wheelhousePrefix= to install from PyPI"
  fields=$(python3 -c 'import json, sys
m = json.load(open(sys.argv[1]))
print(m["torch"], m["cuda"], m["python"], m["min_driver"])' "$WHEELHOUSE/wheelhouse.json") ||
    refuse "wheelhouse manifest $uri is not a chipscale manifest: rebuild it with \`chipscale wheelhouse build --stack $stack\`"
  read -r WHEEL_TORCH WHEEL_CUDA WHEEL_PYTHON WHEEL_MIN_DRIVER <<<"$fields"
  [[ ${WHEEL_TORCH%%+*} == "$CHIPSCALE_TORCH_VERSION" ]] ||
    refuse "the wheelhouse holds torch $WHEEL_TORCH, the stack wants torch $CHIPSCALE_TORCH_VERSION: rebuild it with \`chipscale wheelhouse build --stack $stack --torch-version $CHIPSCALE_TORCH_VERSION\`"
  log "wheelhouse $uri: torch $WHEEL_TORCH (CUDA $WHEEL_CUDA), Python $WHEEL_PYTHON, driver >= $WHEEL_MIN_DRIVER"
}

# The NVIDIA driver of this AMI against the one the torch build needs, before any install: a
# CUDA 13 torch on an older driver would download gigabytes and then find no GPU.
check_torch_driver() {
  local need=${CHIPSCALE_MIN_DRIVER:-} build="PyPI's build" have
  if [[ -n $CHIPSCALE_WHEELHOUSE_URI ]]; then
    read_wheelhouse_manifest
    need=$WHEEL_MIN_DRIVER build="the wheelhouse's CUDA $WHEEL_CUDA build"
  fi
  if [[ -z $need ]]; then
    log "no driver rule for torch $CHIPSCALE_TORCH_VERSION: the check after the install decides"
    return 0
  fi
  # awk reads all of nvidia-smi's output (one line per GPU), so no closed pipe under pipefail.
  have=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | awk 'NR == 1 {print $1}')
  [[ -n $have ]] || refuse "nvidia-smi reports no driver version"
  printf '%s\n%s\n' "$need" "$have" | sort -V -C ||
    refuse "NVIDIA driver $have is older than $need, which torch $CHIPSCALE_TORCH_VERSION ($build) needs: use an AMI with driver >= $need (amiId / amiParameter), or a torch built for an older CUDA"
  log "NVIDIA driver $have: torch $CHIPSCALE_TORCH_VERSION ($build) needs >= $need"
}

download_model() {
  install -d -m 0755 "$MODEL_STORE"
  aws s3 cp --only-show-errors "s3://$CHIPSCALE_MODEL_BUCKET/$CHIPSCALE_MODEL_KEY" \
    "$MODEL_STORE/$CHIPSCALE_MODEL_NAME.mar"
  chmod 0644 "$MODEL_STORE/$CHIPSCALE_MODEL_NAME.mar"
}

# The unit's EnvironmentFile: what varies per host (the unit itself is static). TorchServe
# loads the model from TS_LOAD_MODELS; scale-workers (ExecStartPost) reads the other two.
render_env_file() {
  local java_home=$1 workers=$2
  cat <<EOF
# Written by gpu_host_boot.sh: the model this host serves.
JAVA_HOME=$java_home
CHIPSCALE_MODEL_NAME=$CHIPSCALE_MODEL_NAME
CHIPSCALE_WORKERS=$workers
TS_LOAD_MODELS=$CHIPSCALE_MODEL_NAME=$CHIPSCALE_MODEL_NAME.mar
EOF
}

# install(1) that accepts a file already in place (user data may unpack these files straight
# into /opt/chipscale, where install would refuse to copy a file onto itself).
install_file() {
  local mode=$1 source=$2 target=$3
  [[ $source -ef $target ]] || install -m "$mode" "$source" "$target"
}

install_service() {
  local java_home=$1 workers=$2
  id -u "$SERVICE_USER" >/dev/null 2>&1 ||
    useradd --system --home-dir /var/lib/chipscale --shell /usr/sbin/nologin "$SERVICE_USER"
  install_file 0644 "$HERE/config.properties" "$PREFIX/config.properties"
  install_file 0644 "$HERE/log4j2.xml" "$PREFIX/log4j2.xml"
  install_file 0755 "${BASH_SOURCE[0]}" "$PREFIX/gpu_host_boot.sh" # the unit's ExecStartPost
  install -d -m 0755 "$(dirname "$ENV_FILE")"
  render_env_file "$java_home" "$workers" >"$ENV_FILE"
  install -m 0644 "$HERE/$UNIT" "/etc/systemd/system/$UNIT"
  systemctl daemon-reload
  systemctl enable "$UNIT"
  # Returns once ExecStartPost (scale-workers) has run: the model is registered and scaled.
  systemctl restart "$UNIT"
  install_drain_watcher
}

# The drain watcher's EnvironmentFile: the termination hook it completes once TorchServe has
# no request in flight.
render_drain_env() {
  cat <<EOF
# Written by gpu_host_boot.sh: the termination lifecycle hook chipscale-drain.service completes.
CHIPSCALE_REGION=$CHIPSCALE_REGION
CHIPSCALE_ASG_NAME=$CHIPSCALE_ASG_NAME
CHIPSCALE_DRAIN_HOOK=${CHIPSCALE_DRAIN_HOOK:-chipscale-drain}
CHIPSCALE_DRAIN_TIMEOUT=${CHIPSCALE_DRAIN_TIMEOUT:-120}
EOF
}

# Started before the launch is CONTINUEd, so a host terminated as soon as it is in service
# still drains.
install_drain_watcher() {
  install_file 0755 "$HERE/gpu_host_drain.sh" "$PREFIX/gpu_host_drain.sh"
  render_drain_env >"$DRAIN_ENV_FILE"
  install -m 0644 "$HERE/$DRAIN_UNIT" "/etc/systemd/system/$DRAIN_UNIT"
  systemctl daemon-reload
  systemctl enable --now "$DRAIN_UNIT"
}

install_cloudwatch_agent() {
  local arch
  if [[ $PKG == dnf ]]; then
    install_packages amazon-cloudwatch-agent
    return
  fi
  # Ubuntu has no package for it: the regional bucket's .deb (reached through the S3 endpoint).
  arch=$(dpkg --print-architecture)
  curl -fsS --retry 3 -o /tmp/amazon-cloudwatch-agent.deb \
    "https://amazoncloudwatch-agent-$CHIPSCALE_REGION.s3.$CHIPSCALE_REGION.amazonaws.com/ubuntu/$arch/latest/amazon-cloudwatch-agent.deb"
  dpkg -i -E /tmp/amazon-cloudwatch-agent.deb
  rm -f /tmp/amazon-cloudwatch-agent.deb
}

# cloudwatch-agent.json with the namespace and the log group rendered in (validated in
# validate_env: namespaces and log group names hold no '|', '&' or '\', so sed needs no
# escaping). One series per GPU, dimensions InstanceId and index: append_dimensions replaces
# the host dimension with InstanceId, aggregation_dimensions rolls each metric up to
# (InstanceId, index), and drop_original_metrics drops the originals that also carry the GPU's
# name and arch. The logs section ships this boot's output and TorchServe's logs, one stream
# per instance and file.
render_cloudwatch_config() {
  sed -e "s|$CW_NAMESPACE_PLACEHOLDER|$CHIPSCALE_CW_NAMESPACE|g" \
    -e "s|$LOG_GROUP_PLACEHOLDER|$CHIPSCALE_LOG_GROUP|g" "$HERE/cloudwatch-agent.json"
}

start_cloudwatch_agent() {
  [[ -x $CW_AGENT_DIR/bin/amazon-cloudwatch-agent-ctl ]] || install_cloudwatch_agent
  # The agent runs as cwagent; cloud-init writes its output log root:adm 0640.
  if getent group adm >/dev/null && id -u cwagent >/dev/null 2>&1; then
    usermod -a -G adm cwagent
  fi
  install -d -m 0755 "$PREFIX"
  render_cloudwatch_config >"$PREFIX/cloudwatch-agent.json"
  "$CW_AGENT_DIR/bin/amazon-cloudwatch-agent-ctl" -a fetch-config -m ec2 -s \
    -c "file:$PREFIX/cloudwatch-agent.json"
  AGENT_STARTED=true
}

gpu_count() {
  local count
  count=$(nvidia-smi -L | wc -l)
  ((count > 0)) || die "nvidia-smi lists no GPU"
  echo "$count"
}

# Poll GET /models/NAME until TorchServe answers 200 (it knows the model; workers may still be
# loading). Returns 1 at the deadline.
wait_registered() {
  local model=$1 deadline=$((SECONDS + REGISTER_TIMEOUT))
  until curl -fsS --max-time 5 -o /dev/null "$MANAGEMENT_URL/models/$model" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "TorchServe did not register model $model within ${REGISTER_TIMEOUT}s"
      return 1
    fi
    sleep "$READY_POLL"
  done
}

# How long a readiness wait starting now may last: CHIPSCALE_READY_TIMEOUT or the seconds left
# before the boot deadline, whichever is shorter (900 s when neither is set; 0 when past).
# Sets WAIT_BUDGET and WAIT_LIMIT (what bounds it, for the message).
wait_budget() {
  local left
  left=$(seconds_left)
  WAIT_BUDGET=${READY_TIMEOUT:-$DEFAULT_READY_TIMEOUT}
  WAIT_LIMIT=""
  if [[ -n ${CHIPSCALE_BOOT_DEADLINE:-} ]] && { [[ -z $READY_TIMEOUT ]] || ((left < WAIT_BUDGET)); }; then
    WAIT_BUDGET=$((left > 0 ? left : 0))
    WAIT_LIMIT=" (the boot deadline, before the lifecycle hook times out)"
  fi
}

# Poll GET /models/NAME until at least `expected` workers exist and all are READY. TorchServe's
# /ping says Healthy long before that. Returns 1, having logged why, at the deadline.
wait_ready() {
  local model=$1 expected=$2 deadline body status="no answer yet"
  wait_budget
  deadline=$(($(date +%s) + WAIT_BUDGET))
  log "waiting up to ${WAIT_BUDGET}s${WAIT_LIMIT} for $expected READY worker(s) of $model at $MANAGEMENT_URL"
  while :; do
    if body=$(curl -fsS --max-time 10 "$MANAGEMENT_URL/models/$model" 2>&1); then
      if status=$(python3 -c "$WORKERS_READY_PY" "$expected" <<<"$body"); then
        log "model $model is ready: $status"
        return 0
      fi
    else
      status="management API: ${body:-no answer}"
    fi
    if (($(date +%s) >= deadline)); then
      log "model $model not ready after ${WAIT_BUDGET}s${WAIT_LIMIT}: $status"
      return 1
    fi
    sleep "$READY_POLL"
  done
}

# PUT min_worker=max_worker=N: N workers exactly, spread round robin over the GPUs.
scale_workers() {
  local model=$1 workers=$2 answer
  answer=$(curl -fsS --max-time "$SCALE_TIMEOUT" -X PUT \
    "$MANAGEMENT_URL/models/$model?min_worker=$workers&max_worker=$workers&synchronous=true")
  log "TorchServe: $answer"
}

complete_lifecycle() {
  local result=$1 instance_id
  # Explicit `|| return`: on_exit calls this where errexit is off.
  instance_id=$(imds instance-id) || return 1
  aws autoscaling complete-lifecycle-action --region "$CHIPSCALE_REGION" \
    --auto-scaling-group-name "$CHIPSCALE_ASG_NAME" \
    --lifecycle-hook-name "$CHIPSCALE_LIFECYCLE_HOOK" \
    --instance-id "$instance_id" --lifecycle-action-result "$result" || return 1
  LIFECYCLE_DONE=true
  log "lifecycle action $CHIPSCALE_LIFECYCLE_HOOK completed with $result for $instance_id"
}

# The end of the boot: every worker READY, then CONTINUE. A timeout fails the step, and on_exit
# turns that into ABANDON with the reason logged.
finish_boot() {
  local model=$1 workers=$2
  step "waiting for $workers READY workers of $model"
  wait_ready "$model" "$workers"
  step "completing the lifecycle action"
  stop_deadline_watchdog
  complete_lifecycle CONTINUE
}

# Whatever fails once the lifecycle action can be named, the instance must not wait out the
# hook's heartbeat timeout: say ABANDON now so Auto Scaling replaces it.
on_exit() {
  local rc=$?
  stop_deadline_watchdog
  if ((rc != 0)) && [[ $LIFECYCLE_DONE == false ]]; then
    log "boot failed while ${STEP} (exit $rc): abandoning the launch lifecycle action"
    [[ $AGENT_STARTED == false ]] || sleep "$LOG_FLUSH_SECONDS"
    complete_lifecycle ABANDON || log "could not abandon; the hook's timeout will end the launch"
  fi
  exit "$rc"
}

# A step may hang (a package mirror, S3, a GPU that never initialises) where no check of the
# deadline runs: a background watchdog abandons the launch at CHIPSCALE_BOOT_DEADLINE whatever
# the boot is doing. Auto Scaling then terminates the instance, this script included.
start_deadline_watchdog() {
  [[ -n ${CHIPSCALE_BOOT_DEADLINE:-} ]] || return 0
  local left
  left=$(seconds_left)
  (
    trap - EXIT
    sleep "$((left > 0 ? left : 0))"
    log "boot deadline (epoch $CHIPSCALE_BOOT_DEADLINE) reached before the lifecycle action was completed (the step in progress is the last one logged above): abandoning"
    # This subshell forked before the agent started: its configuration file says it did.
    [[ ! -s $PREFIX/cloudwatch-agent.json ]] || sleep "$LOG_FLUSH_SECONDS"
    complete_lifecycle ABANDON || log "could not abandon; the hook's timeout will end the launch"
  ) &
  WATCHDOG_PID=$!
}

stop_deadline_watchdog() {
  if [[ -n $WATCHDOG_PID ]]; then
    kill "$WATCHDOG_PID" 2>/dev/null || true
    WATCHDOG_PID=""
  fi
}

# ------------------------------------------------------------------------------- entry points

cmd_wait_ready() {
  require_env CHIPSCALE_MODEL_NAME
  : "${CHIPSCALE_EXPECTED_WORKERS:=1}"
  require_positive_int CHIPSCALE_EXPECTED_WORKERS
  [[ -z $READY_TIMEOUT || $READY_TIMEOUT =~ ^[0-9]+$ ]] ||
    usage_error "CHIPSCALE_READY_TIMEOUT must be whole seconds"
  require_cmd curl python3
  wait_ready "$CHIPSCALE_MODEL_NAME" "$CHIPSCALE_EXPECTED_WORKERS" ||
    die "TorchServe workers of $CHIPSCALE_MODEL_NAME not READY within ${WAIT_BUDGET}s"
}

cmd_scale_workers() {
  require_env CHIPSCALE_MODEL_NAME CHIPSCALE_WORKERS
  require_positive_int CHIPSCALE_WORKERS
  [[ $REGISTER_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "CHIPSCALE_REGISTER_TIMEOUT must be whole seconds"
  require_cmd curl
  wait_registered "$CHIPSCALE_MODEL_NAME"
  log "scaling $CHIPSCALE_MODEL_NAME to $CHIPSCALE_WORKERS workers"
  scale_workers "$CHIPSCALE_MODEL_NAME" "$CHIPSCALE_WORKERS"
}

cmd_boot() {
  # As soon as the lifecycle action can be named, any failure (a bad variable included)
  # abandons the launch instead of leaving the instance in Pending:Wait, billing, until the
  # hook times out.
  if [[ -n ${CHIPSCALE_REGION:-} && -n ${CHIPSCALE_ASG_NAME:-} && -n ${CHIPSCALE_LIFECYCLE_HOOK:-} ]]; then
    trap on_exit EXIT
  fi
  STEP="checking the environment"
  require_env "${REQUIRED_VARS[@]}"
  : "${CHIPSCALE_WHEELHOUSE_URI:=}" "${CHIPSCALE_TORCH_VERSION:=2.13.0}" "${CHIPSCALE_MIN_DRIVER:=}"
  validate_env
  ((EUID == 0)) || usage_error "run as root (EC2 user data does)"
  export AWS_DEFAULT_REGION=$CHIPSCALE_REGION
  start_deadline_watchdog
  require_cmd aws curl nvidia-smi systemctl python3
  detect_package_manager
  # Before any install (the agent's included): a missing archive costs one HEAD, not a boot.
  step "checking the model archive s3://$CHIPSCALE_MODEL_BUCKET/$CHIPSCALE_MODEL_KEY"
  check_model_archive
  step "checking the NVIDIA driver against torch $CHIPSCALE_TORCH_VERSION"
  check_torch_driver

  local java_home python gpus workers
  # First, so that whatever fails next is shipped to CloudWatch Logs before the instance goes.
  step "starting the CloudWatch agent (metrics $CHIPSCALE_CW_NAMESPACE, logs $CHIPSCALE_LOG_GROUP)"
  start_cloudwatch_agent
  step "checking Java 17"
  java_home=$(ensure_java)
  step "finding Python 3.10+"
  python=$(ensure_python "$WHEEL_PYTHON")
  step "creating $VENV with torch $CHIPSCALE_TORCH_VERSION and TorchServe $TORCHSERVE_VERSION"
  create_venv "$python"
  step "downloading s3://$CHIPSCALE_MODEL_BUCKET/$CHIPSCALE_MODEL_KEY"
  download_model
  step "counting GPUs"
  gpus=$(gpu_count)
  workers=$((CHIPSCALE_WORKERS_PER_GPU * gpus))
  step "starting $UNIT with $workers workers ($CHIPSCALE_WORKERS_PER_GPU x $gpus GPU(s))"
  install_service "$java_home" "$workers"
  finish_boot "$CHIPSCALE_MODEL_NAME" "$workers"
}

main() {
  case ${1:-boot} in
    boot) cmd_boot ;;
    wait-ready) cmd_wait_ready ;;
    scale-workers) cmd_scale_workers ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
    *) usage_error "unknown command '$1' (expected: boot, wait-ready, scale-workers)" ;;
  esac
}

# Sourcing (tests) defines the functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
