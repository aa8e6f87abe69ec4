#!/usr/bin/env bash
# Installs the Debian packages VoiceOps needs: offline TTS engines for the corpus, espeak-ng for G2P,
# sox/ffmpeg for audio tools, chromium for the release-page browser tests. Safe to run repeatedly.
# SVOX Pico (libttspico-utils, the female English reference voices) is in Debian's non-free component
# (Apache-2.0 code; its language data is redistributable but ships without source): on Debian, where that
# component is not configured, a sources file enabling non-free alone is added for this release.
set -euo pipefail

PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts libttspico-utils sox libsndfile1 ffmpeg chromium chromium-driver)

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
if ! apt-cache policy libttspico-utils | grep -q "Candidate: [0-9]" && [ -r /etc/os-release ]; then
    . /etc/os-release
    if [ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ]; then
        echo "enabling Debian non-free for libttspico-utils: /etc/apt/sources.list.d/voiceops-non-free.sources"
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s %s-updates\nComponents: non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$VERSION_CODENAME" "$VERSION_CODENAME" > /etc/apt/sources.list.d/voiceops-non-free.sources
        apt-get update -q
    fi
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
