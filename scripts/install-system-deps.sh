#!/usr/bin/env bash
# Installs the Debian packages VoiceOps needs: offline TTS engines for the corpus, espeak-ng for G2P,
# sox/ffmpeg for audio tools, chromium for the release-page browser tests. Safe to run repeatedly.
set -euo pipefail

PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsndfile1 ffmpeg chromium chromium-driver)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "VoiceOps needs these Debian packages: ${missing[*]}" >&2
    echo "Install them as root:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
