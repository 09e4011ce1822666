#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian bookworm machine (run as root):
# system voices and recordings, a .venv with pinned Python packages, the nanodrz package,
# and the real annotated test conversation from the pyannote.audio wheel.
# Every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SYSTEM_PACKAGES=(
  sox libsox-fmt-all unzip
  espeak-ng mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 mbrola-de1 mbrola-fr1
  rhvoice rhvoice-english rhvoice-russian rhvoice-ukrainian rhvoice-polish rhvoice-brazilian-portuguese
  rhvoice-albanian rhvoice-esperanto rhvoice-kyrgyz rhvoice-macedonian rhvoice-tatar
  libttspico-utils flite
  festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
  fillets-ng-data-cs fillets-ng-data-nl klettres-data
  asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav
  asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav
  asterisk-prompt-es-co asterisk-prompt-fr-armelle asterisk-prompt-it-menardi-wav
  asterisk-moh-opsound-wav sound-theme-freedesktop codec2-examples pocketsphinx-testdata
  fortunes fortunes-min
)

missing_system_packages() {
  local p
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

if [ -n "$(missing_system_packages)" ]; then
  echo "[setup] installing system packages (voices, recordings, sox)"
  sources=/etc/apt/sources.list.d/debian.sources
  if [ -f "$sources" ] && ! grep -q "contrib" "$sources"; then
    sed -i '0,/^Components: main$/s//Components: main contrib non-free/' "$sources"
  elif [ -f /etc/apt/sources.list ] && ! grep -q "contrib" /etc/apt/sources.list; then
    sed -i -E 's/^(deb .* bookworm main)$/\1 contrib non-free/' /etc/apt/sources.list
  fi
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(missing_system_packages) >/dev/null
else
  echo "[setup] system packages already installed"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.nanodrz-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev,ray]"
  echo "$want" > "$stamp"
else
  echo "[setup] Python packages already installed"
fi

sample_dir=data/pyannote-sample
if [ ! -f "$sample_dir/sample.rttm" ]; then
  echo "[setup] extracting the annotated pyannote.audio sample conversation"
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --no-deps -d "$tmp" "pyannote.audio==4.0.7"
  mkdir -p "$sample_dir"
  unzip -q -j -o "$tmp"/pyannote_audio-*.whl 'pyannote/audio/sample/sample.wav' 'pyannote/audio/sample/sample.rttm' -d "$sample_dir"
  rm -rf "$tmp"
fi
echo "[setup] done"
