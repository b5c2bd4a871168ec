#!/usr/bin/env bash
# Makes the sample clip of the README's main job (examples/clip.mp4) and the small video files
# the tests read (tests/fixtures/video/), with ffmpeg alone (its lavfi sources, libx264 and its
# native AAC encoder). The files are committed; run this to make them again (byte-identical with
# the same ffmpeg build; any ffmpeg makes files the tests accept).
#
# The scene is the one of examples/frames (a cottage, a sun, a striped field), drawn per pixel
# by geq: the sun crosses the sky and the field's stripes scroll, so that every frame differs.
# The video is what users have: libx264's defaults (High profile, CABAC, 3 B-frames with
# B-pyramid, 8x8 transforms, weighted prediction) in MP4, with an AAC track.
set -euo pipefail
cd "$(dirname "$0")/.."
ffmpeg="${FFMPEG:-ffmpeg}"

# The scene at any size: coordinates are scaled to a 512x512 drawing.
x="(X*512/W)"
y="(Y*512/H)"
sun="lt(hypot($x-(120+100*T),$y-140),50)"
wall="between($x,300,420)*between($y,250,360)"
roof="between($y,190,250)*lt(abs($x-360),($y-190)*7/6)"
ground="gte($y,330)"
stripe="(1+cos(($x+40*T)/16))/2"
pick() { echo "if($wall,$1,if($roof,$2,if($sun,$3,if($ground,$4,$5))))"; }
r="$(pick 170 122 250 "40+40*$stripe" "112+48*$y/330")"
g="$(pick 82 50 218 "115+50*$stripe" "160+35*$y/330")"
b="$(pick 60 42 90 "50+40*$stripe" "230-25*$y/330")"
scene() { # WIDTH HEIGHT RATE SECONDS
  echo "color=c=black:s=$1x$2:r=$3:d=$4,format=gbrp,geq=r='$r':g='$g':b='$b'"
}
tone() { # SECONDS
  echo "sine=frequency=440:sample_rate=48000:duration=$1"
}
encode() {
  "$ffmpeg" -hide_banner -loglevel error -y -bitexact "$@"
}

# The README's sample clip: 512x512, 24 fps, 2 s (48 frames), H.264 High + AAC, about 36 KB.
encode -f lavfi -i "$(scene 512 512 24 2)" -f lavfi -i "$(tone 2)" \
  -map 0:v -map 1:a -c:v libx264 -pix_fmt yuv420p -c:a aac -b:a 64k -shortest \
  -fflags +bitexact -flags:v +bitexact -flags:a +bitexact examples/clip.mp4

mkdir -p tests/fixtures/video
# The tests' clip: 96x64 (cropped to the tiny model's 64x64), 24 fps, 16 frames, keyframes
# every 8 (two GOPs), B-frames, AAC.
encode -f lavfi -i "$(scene 96 64 24 1)" -f lavfi -i "$(tone 1)" \
  -map 0:v -map 1:a -c:v libx264 -pix_fmt yuv420p -g 8 -c:a aac -b:a 32k -t 0.6667 \
  -fflags +bitexact -flags:v +bitexact -flags:a +bitexact tests/fixtures/video/bframes.mp4
# The same clip fragmented, as recorders and packagers write it (copied, not re-encoded): CMAF
# style (an index without samples, every fragment's data offsets from its moof) and ffmpeg's
# plain fragmenting (the first fragment's samples in the index, explicit base offsets).
encode -i tests/fixtures/video/bframes.mp4 -c copy -fflags +bitexact \
  -movflags frag_keyframe+empty_moov+default_base_moof tests/fixtures/video/frag-cmaf.mp4
encode -i tests/fixtures/video/bframes.mp4 -c copy -fflags +bitexact -movflags frag_keyframe \
  tests/fixtures/video/frag-moov.mp4
# The same clip in Matroska (OBS's default recording format), copied.
encode -i tests/fixtures/video/bframes.mp4 -c copy -fflags +bitexact tests/fixtures/video/bframes.mkv
# Refused inputs: no video; MPEG-4 Part 2 video; H.264 High 4:4:4 Predictive; H.264 High 10.
encode -f lavfi -i "$(tone 0.2)" -c:a aac -b:a 32k -fflags +bitexact -flags:a +bitexact \
  tests/fixtures/video/audio-only.m4a
encode -f lavfi -i "$(scene 64 64 24 0.1667)" -c:v mpeg4 -frames:v 4 -fflags +bitexact \
  -flags:v +bitexact tests/fixtures/video/mpeg4.mp4
encode -f lavfi -i "$(scene 64 64 24 0.1667)" -c:v libx264 -pix_fmt yuv444p -frames:v 4 \
  -fflags +bitexact -flags:v +bitexact tests/fixtures/video/yuv444.mp4
encode -f lavfi -i "$(scene 64 64 24 0.1667)" -c:v libx264 -pix_fmt yuv420p10le -frames:v 4 \
  -fflags +bitexact -flags:v +bitexact tests/fixtures/video/high10.mp4
ls -l examples/clip.mp4 tests/fixtures/video/
