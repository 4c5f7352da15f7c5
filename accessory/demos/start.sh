#!/usr/bin/env bash
# Start a LLaMA2-Accessory demo: asks which one (or takes flags / environment variables).
#
#   bash accessory/demos/start.sh                       # terminal: a short menu, Enter takes the defaults
#   bash accessory/demos/start.sh --scenario 2          # multi-turn chat on the embedded SmolLM2 model
#   bash accessory/demos/start.sh --scenario 1 --pretrained_path /models/llama2-7b --port 7860
#   SCENARIO=2 PRETRAINED_PATH=/models/llama2-7b-chat bash accessory/demos/start.sh
#   bash accessory/demos/start.sh --scenario 1 --nproc 2 --pretrained_path /models/llama2-13b   # 2 processes
#
# With no flags and no terminal (or --yes) it starts the multi-turn demo on the embedded demo model.
# Flags: --scenario N, --pretrained_path DIR (repeatable), --llama_type T, --llama_config FILE (repeatable),
#        --tokenizer_path F, --quant [SCHEME], --nproc N, --dtype D, --host H, --port P, --share, --yes, --dry-run.
# Anything after `--` goes to the demo unchanged.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

scenario="${SCENARIO:-}"
pretrained=()
[[ -n "${PRETRAINED_PATH:-}" ]] && pretrained=($PRETRAINED_PATH)
llama_type="${LLAMA_TYPE:-}"
llama_config=()
[[ -n "${LLAMA_CONFIG:-}" ]] && llama_config=($LLAMA_CONFIG)
tokenizer_path="${TOKENIZER_PATH:-}"
quant="${QUANT:-}"
nproc="${NPROC:-1}"
dtype="${DTYPE:-}"
host="${HOST:-}"
port="${PORT:-}"
share=""
assume_defaults=""
dry_run=""
extra=()
flags_given=""
[[ -n "$scenario$llama_type$tokenizer_path$quant$dtype$host$port${PRETRAINED_PATH:-}" ]] && flags_given=1

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  flags_given=1
  case "$1" in
    --scenario) scenario="$2"; shift 2 ;;
    --pretrained_path) pretrained+=("$2"); shift 2 ;;
    --llama_type) llama_type="$2"; shift 2 ;;
    --llama_config) llama_config+=("$2"); shift 2 ;;
    --tokenizer_path) tokenizer_path="$2"; shift 2 ;;
    --quant) if [[ $# -gt 1 && "$2" != -* ]]; then quant="$2"; shift 2; else quant=1; shift; fi ;;
    --nproc|--n_gpus) nproc="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --share) share=1; shift ;;
    --yes|-y) assume_defaults=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

ask() {  # ask "question" default -> echoes the answer (the default on an empty line)
  local reply
  read -r -p "$1 [$2]: " reply || reply=""
  echo "${reply:-$2}"
}

if [[ -z "$flags_given$assume_defaults" && -t 0 ]]; then
  echo "Model download is not available from here yet: put a checkpoint directory on disk, or leave the"
  echo "path empty to use the embedded SmolLM2-135M-Instruct demo model (built on first use)."
  echo "Scenarios:"
  echo "  1) single-turn text demo"
  echo "  2) multi-turn text chat demo"
  echo "  3) single-turn multimodal demo      (needs a multimodal checkpoint)"
  echo "  4) multi-turn multimodal demo       (needs a multimodal checkpoint)"
  echo "  5) multi-turn multimodal box demo   (not available yet)"
  echo "  6) terminal chat                    (accessory chat)"
  scenario="$(ask "Scenario" 2)"
  path="$(ask "Checkpoint directory (empty: embedded demo model)" "")"
  [[ -n "$path" ]] && pretrained=("$path")
  if [[ -n "$path" ]]; then
    tokenizer_path="$(ask "Tokenizer file (empty: found in the checkpoint dir)" "")"
    llama_type="$(ask "llama_type (empty: from the checkpoint's meta.json)" "")"
  fi
  [[ "$(ask "Enable quantization? (y/n)" n)" == y ]] && quant=1
  port="$(ask "Port (empty: gradio's default)" "")"
fi
scenario="${scenario:-2}"

for p in ${pretrained[@]+"${pretrained[@]}"}; do [[ -d "$p" ]] || die "checkpoint directory $p does not exist"; done
[[ -z "$tokenizer_path" || -f "$tokenizer_path" ]] || die "tokenizer file $tokenizer_path does not exist"
for c in ${llama_config[@]+"${llama_config[@]}"}; do [[ -f "$c" ]] || die "config file $c does not exist"; done
[[ -z "$port" || ( "$port" =~ ^[0-9]+$ && "$port" -le 65535 ) ]] || die "port must be 0-65535, got $port"
[[ "$nproc" =~ ^[0-9]+$ ]] || die "--nproc must be a number, got $nproc"
[[ "$nproc" -ge 1 ]] || die "--nproc must be 1 or more, got $nproc"

args=()
[[ ${#pretrained[@]} -gt 0 ]] && args+=(--pretrained_path "${pretrained[@]}")
[[ -n "$llama_type" ]] && args+=(--llama_type "$llama_type")
[[ ${#llama_config[@]} -gt 0 ]] && args+=(--llama_config "${llama_config[@]}")
[[ -n "$tokenizer_path" ]] && args+=(--tokenizer_path "$tokenizer_path")
[[ -n "$quant" && "$quant" != 1 ]] && args+=(--quant "$quant")
[[ "$quant" == 1 ]] && args+=(--quant)
[[ -n "$dtype" ]] && args+=(--dtype "$dtype")
[[ -n "$host" ]] && args+=(--host "$host")
[[ -n "$port" ]] && args+=(--port "$port")
[[ -n "$share" ]] && args+=(--share)
args+=(${extra[@]+"${extra[@]}"})

# Several model-parallel processes: the single-turn demos run under torchrun (one process each), the
# multi-turn ones start their followers themselves (--n_gpus).
single=("$PYTHON" -m)
[[ "$nproc" == 1 ]] || single=("$PYTHON" -m torch.distributed.run --nproc-per-node "$nproc" -m)

case "$scenario" in
  1) cmd=("${single[@]}" accessory.demos.single_turn ${args[@]+"${args[@]}"}) ;;
  2) cmd=("$PYTHON" -m accessory.demos.multi_turn --n_gpus "$nproc" ${args[@]+"${args[@]}"}) ;;
  3|4) [[ ${#pretrained[@]} -gt 0 ]] || die "scenario $scenario (multimodal) needs --pretrained_path: the embedded demo model sees no images"
     if [[ "$scenario" == 3 ]]; then cmd=("${single[@]}" accessory.demos.single_turn_mm ${args[@]+"${args[@]}"})
     else cmd=("$PYTHON" -m accessory.demos.multi_turn_mm ${args[@]+"${args[@]}"})
          [[ "$nproc" == 1 ]] || cmd+=(--n_gpus "$nproc"); fi ;;
  5) die "scenario 5 (multimodal box demo) is not available yet" ;;
  6) [[ "$nproc" == 1 ]] || die "scenario 6 (terminal chat) runs one process; drop --nproc $nproc"
     cmd=("$PYTHON" -m accessory.cli chat ${pretrained[@]+"${pretrained[-1]}"}) ;;
  7) die "scenario 7 (multimodal terminal tool) is not available yet" ;;
  *) die "unknown scenario $scenario: 1 single-turn, 2 multi-turn, 6 terminal chat" ;;
esac

if [[ -n "$dry_run" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
