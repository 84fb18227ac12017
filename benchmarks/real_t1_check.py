"""Does the bundled model hold up on a real T1 contrast? MNI152 (nilearn's copy) vs validation subjects.

The shared brains have a synthesised T1 contrast. The only real T1 data a package ships here is
nilearn's MNI152 ICBM 2009a symmetric template (``nilearn.datasets.load_mni152_template``), with
its grey- and white-matter probability maps (``load_mni152_gm_template`` / ``..._wm_template``) and
brain mask (``load_mni152_brain_mask``), all inside the nilearn package: nothing is downloaded
(``fetch_icbm152_2009`` would download, and is not used). It is a real-scanner T1 contrast, but an
average of 152 brains: smoother, with less noise and a cleaner skull strip than a single scan.

For each validation subject S, both ways and with the model's affine pre-alignment
(``register(..., affine="affine")``):

* fixed = S, moving = MNI (skull-stripped with its brain mask): the MNI GM/WM probability maps are
  carried onto S (linear interpolation, thresholded at 0.5) and compared with S's GM/WM masks from
  its FreeSurfer labels; and S's labels are carried onto MNI by the backward field;
* fixed = MNI, moving = S: the same the other way round.

Each overlap is given with no alignment (identity in physical space), after the affine part alone,
and after affine + deformable. Folding and inverse-consistency error come from ``register``'s
report. GM = cerebral and cerebellar cortex + deep grey nuclei (thalamus, caudate, putamen,
pallidum, hippocampus, amygdala, accumbens, ventral DC); WM = cerebral + cerebellar white matter.

    python benchmarks/real_t1_check.py --model Resources/InverseReg-default.pt \
        --data /work/shared/data/brains --subjects 11 12 --report docs/benchmark.md
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

GM_LABELS = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60)
WM_LABELS = (2, 41, 7, 46)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")


def load_mni(tmp: Path):
    """MNI152 T1 (skull-stripped with its brain mask), GM and WM probability maps, as SimpleITK."""
    import SimpleITK as sitk
    from nilearn import datasets
    from nilearn.image import new_img_like

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    stripped = new_img_like(t1, np.asarray(t1.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0))
    out = {}
    for name, img in (("t1", stripped), ("gm", datasets.load_mni152_gm_template(resolution=1)),
                      ("wm", datasets.load_mni152_wm_template(resolution=1))):
        path = tmp / f"mni_{name}.nii.gz"
        img.to_filename(str(path))  # nibabel writes the RAS affine; SimpleITK reads it as LPS
        out[name] = sitk.ReadImage(str(path), sitk.sitkFloat32)
    return out


def tissue_from_labels(labels: np.ndarray) -> dict:
    return {"gm": np.isin(labels, GM_LABELS), "wm": np.isin(labels, WM_LABELS)}


def tissue_from_maps(gm: np.ndarray, wm: np.ndarray) -> dict:
    return {"gm": gm > 0.5, "wm": wm > 0.5}


def overlap(a: dict, b: dict) -> dict:
    return {k: dice(a[k], b[k]) for k in ("gm", "wm")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default=str(ROOT / "Resources" / "InverseReg-default.pt"))
    parser.add_argument("--data", default="/work/shared/data/brains")
    parser.add_argument("--subjects", nargs="*", default=["11", "12"])
    parser.add_argument("--affine", default="affine", choices=["affine", "rigid", "none"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/work/runs/real_t1_check")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "real_t1_check.png"))
    parser.add_argument("--report", help="markdown file whose <!-- real-t1:begin/end --> block gets the table")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import SimpleITK as sitk
    sys.path.insert(0, str(ROOT))
    from InverseRegLib.data import discover_subjects
    from InverseRegLib.fields import image_to_field, warp_image
    from InverseRegLib.grid import Geometry
    from InverseRegLib.imageio import read_image, read_label
    from InverseRegLib.modelfile import load_model
    from InverseRegLib.pipeline import register

    affine_mode = None if args.affine == "none" else args.affine
    if affine_mode is not None:
        try:
            from InverseRegLib.affine import affine_align  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"the affine module is not available ({exc}); rerun with --affine none") from None
    model = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subjects = {s.name: s for s in discover_subjects(args.data)}
    results = []
    figure_data = None
    with tempfile.TemporaryDirectory() as tmp:
        mni = load_mni(Path(tmp))
        mni_geometry = Geometry.of(mni["t1"])
        mni_tissue = tissue_from_maps(sitk.GetArrayFromImage(mni["gm"]), sitk.GetArrayFromImage(mni["wm"]))
        for name in args.subjects:
            subject = subjects[name]
            image, label = read_image(subject.image), read_label(subject.label)
            geometry = Geometry.of(image)
            labels = sitk.GetArrayFromImage(label).astype(np.int32)
            subject_tissue = tissue_from_labels(labels)

            def mni_maps_on(reference_geometry, transform=None, field=None):
                maps = []
                for key in ("gm", "wm"):
                    if field is not None:
                        warped = warp_image(mni[key], field, reference_geometry)
                    else:
                        warped = sitk.Resample(mni[key], reference_geometry.reference_image(),
                                               transform or sitk.Transform(), sitk.sitkLinear, 0.0)
                    maps.append(sitk.GetArrayFromImage(warped))
                return tissue_from_maps(*maps)

            def labels_on(reference_geometry, transform=None, field=None):
                if field is not None:
                    warped = warp_image(label, field, reference_geometry, nearest=True)
                else:
                    warped = sitk.Resample(label, reference_geometry.reference_image(), transform or sitk.Transform(),
                                           sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
                return tissue_from_labels(sitk.GetArrayFromImage(warped))

            for fixed_is_subject in (True, False):
                fixed, moving = (image, mni["t1"]) if fixed_is_subject else (mni["t1"], image)
                t0 = time.perf_counter()
                result = register(fixed, moving, model, device="cpu", affine=affine_mode)
                seconds = time.perf_counter() - t0
                forward, _ = image_to_field(result.forward)
                backward, _ = image_to_field(result.backward)
                a = result.affine
                a_inv = a.GetInverse() if a is not None else None
                row = {"subject": name, "fixed": name if fixed_is_subject else "MNI152",
                       "moving": "MNI152" if fixed_is_subject else name, "seconds": round(seconds, 2),
                       **{k: result.report.get(k) for k in ("folding_percent_forward", "folding_percent_backward",
                                                            "folding_percent_forward_foreground", "ice_mean_mm",
                                                            "ice_p95_mm", "seconds_affine", "seconds_network")}}
                if fixed_is_subject:
                    # MNI tissue -> subject grid (forward field); subject labels -> MNI grid (backward)
                    on_subject = {"none": mni_maps_on(geometry), "affine": mni_maps_on(geometry, a),
                                  "deformable": mni_maps_on(geometry, field=forward)}
                    on_mni = {"none": labels_on(mni_geometry), "affine": labels_on(mni_geometry, a_inv),
                              "deformable": labels_on(mni_geometry, field=backward)}
                    if figure_data is None:
                        figure_data = (name, sitk.GetArrayFromImage(image), subject_tissue,
                                       sitk.GetArrayFromImage(sitk.Resample(mni["t1"], image, a or sitk.Transform())),
                                       sitk.GetArrayFromImage(result.moving_warped))
                else:
                    # subject labels -> MNI grid (forward); MNI tissue -> subject grid (backward)
                    on_mni = {"none": labels_on(mni_geometry), "affine": labels_on(mni_geometry, a),
                              "deformable": labels_on(mni_geometry, field=forward)}
                    on_subject = {"none": mni_maps_on(geometry), "affine": mni_maps_on(geometry, a_inv),
                                  "deformable": mni_maps_on(geometry, field=backward)}
                row["dice_on_subject_grid"] = {stage: overlap(t, subject_tissue) for stage, t in on_subject.items()}
                row["dice_on_mni_grid"] = {stage: overlap(t, mni_tissue) for stage, t in on_mni.items()}
                results.append(row)
                print(json.dumps(row), flush=True)

    lines = ["| fixed ← moving | grid | GM Dice none / affine / deformable | WM Dice none / affine / deformable | "
             "fold % fwd / bwd | ICE mean / p95 mm | s (affine, network, total) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for grid_key, grid_name in (("dice_on_subject_grid", "subject"), ("dice_on_mni_grid", "MNI152")):
            d = r[grid_key]
            lines.append(
                f"| {r['fixed']} ← {r['moving']} | {grid_name} | "
                + " / ".join(f"{d[s]['gm']:.3f}" for s in ("none", "affine", "deformable")) + " | "
                + " / ".join(f"{d[s]['wm']:.3f}" for s in ("none", "affine", "deformable")) + " | "
                + f"{r['folding_percent_forward']:.4f} / {r['folding_percent_backward']:.4f} | "
                + f"{r['ice_mean_mm']:.3f} / {r['ice_p95_mm']:.3f} | "
                + f"{r['seconds_affine']:.1f}, {r['seconds_network']:.1f}, {r['seconds']:.1f} |")
    table = "\n".join(lines)
    mean = {stage: {t: float(np.mean([r[g][stage][t] for r in results for g in ("dice_on_subject_grid", "dice_on_mni_grid")]))
                    for t in ("gm", "wm")} for stage in ("none", "affine", "deformable")}
    summary = {"model": str(args.model), "model_id": model.model_id, "affine": affine_mode, "threads": args.threads,
               "subjects": args.subjects, "gm_labels": GM_LABELS, "wm_labels": WM_LABELS, "results": results,
               "mean": mean, "command": "python " + " ".join(sys.argv)}
    (out / "real_t1_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table)
    print("mean:", json.dumps(mean))

    if figure_data is not None and args.figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        name, subject_image, tissue, mni_affine, mni_deformed = figure_data
        z = int(np.argwhere(tissue["wm"]).mean(axis=0)[0])
        fig, axes = plt.subplots(1, 3, figsize=(10, 4))
        for ax, (title, array) in zip(axes, ((f"subject {name} (synthetic T1)", subject_image),
                                             ("MNI152 after affine", mni_affine),
                                             ("MNI152 after affine + InverseNet", mni_deformed))):
            ax.imshow(array[z], cmap="gray")
            ax.contour(tissue["gm"][z], levels=[0.5], colors="c", linewidths=0.5)
            ax.contour(tissue["wm"][z], levels=[0.5], colors="r", linewidths=0.6)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"Real T1 (MNI152) onto subject {name}; axial slice; contours: subject GM (cyan), WM (red, drawn on top)", fontsize=9)
        fig.tight_layout()
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=110)
        plt.close(fig)
        print("figure:", args.figure)

    if args.report:
        report = Path(args.report)
        text = report.read_text() if report.exists() else ""
        block = (f"<!-- real-t1:begin -->\n<!-- written by benchmarks/real_t1_check.py; do not edit by hand -->\n\n"
                 f"Command:\n\n```\n{summary['command']}\n```\n\nModel `{args.model}` (id {model.model_id}), "
                 f"affine pre-alignment: {affine_mode}, {args.threads} thread(s).\n\n{table}\n\n"
                 "Mean over runs and grids (none → affine → deformable): "
                 + "; ".join(f"{t.upper()} " + " → ".join(f"{mean[s][t]:.3f}" for s in ("none", "affine", "deformable"))
                             for t in ("gm", "wm"))
                 + "\n\n<!-- real-t1:end -->")
        if "<!-- real-t1:begin -->" in text and "<!-- real-t1:end -->" in text:
            text = re.sub(r"<!-- real-t1:begin -->.*?<!-- real-t1:end -->", lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
