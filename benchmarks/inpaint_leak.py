"""Inpainting that knows nothing of what the mask hides (issue 19): how much the old whole-image encoding leaked,
what the visible-pixel fill (`sundae.sundae.fill_masked`) costs, and whether one more ring of regenerated cells
(`--dilate 1`) should be the default.

    python benchmarks/inpaint_leak.py --generator quickstart      # a `sundae quickstart` folder (Fashion-MNIST)

Protocol: the first `--num` Fashion-MNIST test images (32 x 32, the quickstart's tokenizer, f = 4), a centre
square `--hole` pixels wide masked (16: the 4 x 4 centre cells of the 8 x 8 grid). Three ways to inpaint, each
with the generator's stored sampler and the true class as the condition, `--seeds` sampling seeds:
- `whole-image` (before this fix): the kept tokens are encoded from the whole image, hidden pixels included;
- `fill` (`--passes 1`): the masked pixels are replaced by the visible-pixel fill before encoding;
- `fill-dilate1`: the same, and one more ring of cells around the hole is regenerated;
- `fill-2passes` (the library's default, `--passes 2`): the fill's completion, with the visible pixels
  pasted back, is encoded again and the hole sampled once more around those kept tokens (twice the
  sampling; still blind to the hidden pixels).
Per way:
- leak: the share of kept tokens that change when the hidden square is replaced by another image's (image
  i + 1); the completions' mean absolute difference inside the hole between the two versions;
- kept-token agreement: the share of kept tokens equal to the whole image's tokens, for the ring of cells
  around the hole and for all kept cells (what the fill costs the context the generator sees; for
  2 passes, the second pass's kept tokens);
- error against the hidden original inside the hole (mean absolute, [-1, 1] pixels): lower when the
  completions know the hidden content;
- classifier-FID of the completions against the whole test split (the `sundae evaluate` classifier, trained
  on the train split and cached at `--classifier`), and class accuracy of the completions (the judge's class
  equals the image's label).
Reference rows: the tokenizer's reconstructions of the same images (the floor) and the images with the hole
left filled (no generator). Prints a table and writes benchmarks/results/inpaint_leak.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from common import RESULTS, print_table, write_json  # noqa: E402  (puts src/ on the path)

from sundae.eval.classifier import predict
from sundae.eval.metrics import classifier_features, frechet_distance
from sundae.eval.protocol import load_or_train_classifier, load_reference
from sundae.pipeline import SundaePipeline, class_logits_fn
from sundae.sundae import fill_masked, sample, token_keep_mask


def inpaint_batch(pipe: SundaePipeline, images: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, seed: int,
                  fill: bool, dilate: int, rounds: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completions of `images` (`b c H W`), one per image, under one `mask` (`1 1 H W`): (images, init tokens
    of the last round, keep `h w`). Image i draws with seed + i, as `SundaePipeline.inpaint` does for one
    image. rounds > 1 re-encodes each round's composite (visible pixels + the decoded completion) and samples
    the regenerated cells again around those kept tokens: still a function of the visible pixels only."""
    tok, f = pipe.tokenizer, pipe.tokenizer.cfg.f
    keep = token_keep_mask(mask, f, dilate)[0]
    keep_px = keep.repeat_interleave(f, 0).repeat_interleave(f, 1)[None, None, :images.shape[-2], :images.shape[-1]]
    fn = class_logits_fn(pipe.generator, labels)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
    x = fill_masked(images, mask) if fill else images
    for _ in range(rounds):
        init = tok.encode(x)
        z, _ = sample(fn, tuple(init.shape), pipe.generator.cfg.codebook_size, pipe.sampler, init=init,
                      keep=keep.expand_as(init), generator=gens, device=torch.device("cpu"))
        x = torch.where(keep_px, images, tok.decode(z, size=tuple(images.shape[-2:])).clamp(-1, 1))
    return x, init, keep


# (name, fill the masked pixels, dilate, rounds)
WAYS = [("whole-image", False, 0, 1), ("fill", True, 0, 1), ("fill-dilate1", True, 1, 1), ("fill-2passes", True, 0, 2),
        ("fill-3passes", True, 0, 3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="quickstart", help="a quickstart folder, run, export or bundle")
    p.add_argument("--classifier", default="quickstart/classifier.pt", help="the `sundae evaluate` classifier file "
                   "(trained there on the Fashion-MNIST train split when missing)")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--hole", type=int, default=16, help="side of the centre square masked, pixels")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--ways", help="a comma-separated subset of: " + ", ".join(w[0] for w in WAYS))
    p.add_argument("--out", default=str(RESULTS / "inpaint_leak.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    t_start = time.time()
    pipe = SundaePipeline.from_pretrained(args.generator, device="cpu")
    channels = pipe.tokenizer.cfg.in_channels
    ref = load_reference("fashion-mnist:test", 32, channels)
    judge, _ = load_or_train_classifier(Path(args.classifier), ref, epochs=2, seed=0, progress=False)
    ref_feats = classifier_features(judge, ref.images)
    images, labels = ref.images[:args.num], ref.labels[:args.num]
    other = images.roll(1, 0)  # the hidden square of image i is replaced by image i + 1's
    mask = torch.zeros(1, 1, 32, 32)
    lo = (32 - args.hole) // 2
    mask[..., lo:lo + args.hole, lo:lo + args.hole] = 1
    hole = mask.bool().expand_as(images)
    swapped = torch.where(hole, other, images)
    f = pipe.tokenizer.cfg.f

    def score(x: torch.Tensor) -> dict[str, float]:
        return {"cfid": frechet_distance(ref_feats, classifier_features(judge, x)),
                "class_acc": (predict(judge, x) == labels).float().mean().item()}

    with torch.inference_mode():
        whole = torch.cat([pipe.tokenizer.encode(images[i:i + args.batch_size])
                           for i in range(0, args.num, args.batch_size)])
        recon = torch.cat([pipe.tokenizer.decode(whole[i:i + args.batch_size]).clamp(-1, 1)
                           for i in range(0, args.num, args.batch_size)])
        rows = [{"way": "tokenizer reconstructions (floor)", **score(recon)},
                {"way": "hole left filled, no generator", **score(fill_masked(images, mask))}]
        ring = ~token_keep_mask(mask, f, 1)[0] & token_keep_mask(mask, f, 0)[0]
        for way, fill, dilate, rounds in WAYS:
            if args.ways and way not in args.ways.split(","):
                continue
            per_seed = []
            for seed in range(args.seeds):
                outs, inits = [], []
                for x in (images, swapped):
                    parts = [inpaint_batch(pipe, x[i:i + args.batch_size], mask, labels[i:i + args.batch_size],
                                           seed * 100_000 + i, fill, dilate, rounds) for i in range(0, args.num, args.batch_size)]
                    outs.append(torch.cat([o for o, _, _ in parts]))
                    inits.append(torch.cat([z for _, z, _ in parts]))
                    keep = parts[0][2]
                kept0 = token_keep_mask(mask, f, 0)[0]
                per_seed.append({
                    **score(outs[0]),
                    "kept_tokens_changed_by_hidden": (inits[0] != inits[1])[:, keep].float().mean().item(),
                    "hole_diff_between_versions": (outs[0] - outs[1]).abs()[hole].mean().item(),
                    "ring_tokens_as_whole_image": (inits[0] == whole)[:, ring].float().mean().item(),
                    "kept_tokens_as_whole_image": (inits[0] == whole)[:, kept0].float().mean().item(),
                    "hole_error_vs_hidden": (outs[0] - images).abs()[hole].mean().item(),
                })
                print(f"  {way}, seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[-1].items()),
                      flush=True)
            row = {"way": way, "dilate": dilate, "rounds": rounds, "per_seed": per_seed}
            for k in per_seed[0]:
                vals = torch.tensor([s[k] for s in per_seed])
                row[k], row[k + "_std"] = vals.mean().item(), (vals.std().item() if len(vals) > 1 else 0.0)
            rows.append(row)

    print_table(rows, [("way", "way", "s"), ("cfid", "cFID", ".1f"), ("cfid_std", "+-", ".1f"),
                       ("class_acc", "class acc", ".3f"),
                       ("kept_tokens_changed_by_hidden", "kept tokens moved by hidden", ".3f"),
                       ("hole_diff_between_versions", "hole diff between versions", ".3f"),
                       ("ring_tokens_as_whole_image", "ring tokens = whole image", ".3f"),
                       ("kept_tokens_as_whole_image", "kept tokens = whole image", ".3f"),
                       ("hole_error_vs_hidden", "hole error vs hidden", ".3f")])
    write_json(Path(args.out), {
        "protocol": {"generator": str(args.generator), "sampler": dataclasses.asdict(pipe.sampler), "num": args.num, "hole": args.hole, "seeds": args.seeds,
                     "reference": "Fashion-MNIST test split (10,000), classifier features",
                     "images": f"the first {args.num} test images, hidden square swapped with image i + 1's"},
        "rows": rows, "seconds": time.time() - t_start})
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
