"""Print the short table of a GPU suite run from the JSON files in a folder."""

import json
import pathlib
import sys


def fake_quant(data):
    rows = data["rows"]
    by = {(r["case"], r["impl"]): r for r in rows}
    print(
        f"\nfake-quant fwd+bwd, {data['device']}, {data['dtype']}, {data['numel']} elements; "
        f"copy {data['copy_gbps']:.0f} GB/s"
    )
    print(
        f"{'case':26s} {'ctmq GB/s':>9s} {'of copy':>8s} {'vs eager':>9s} {'vs compile':>10s} "
        f"{'vs torch op':>11s}"
    )
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = by[(case, "ctmq")]
        comp = by.get((case, "torch.compile(eager)"))
        op = by[(case, "torch.fake_quantize")]
        vs_comp = f"{comp['ms'] / ours['ms']:9.2f}x" if comp else f"{'-':>10s}"
        print(
            f"{case:26s} {ours['gbps']:9.0f} {ours['of_copy']:7.0%} {ours['vs_eager']:8.2f}x "
            f"{vs_comp} {op['ms'] / ours['ms']:10.2f}x"
        )


def qat_step(data):
    print(
        f"\nResNet-18 train step, {data['device']}, batch {data['batch']}, "
        f"{data['image_size']}x{data['image_size']}, bf16 autocast, channels_last"
    )
    print(f"{'mode':9s} {'stage':6s} {'quantizers':10s} {'ms':>8s} {'img/s':>8s} {'vs FP':>7s}")
    for r in data["rows"]:
        stage = "FP" if r["bits"] == 32 else f"W{r['bits']}A{r['bits']}"
        print(
            f"{r['mode']:9s} {stage:6s} {r['quantizers']:10s} {r['ms']:8.2f} {r['img_s']:8.0f} "
            f"{r['vs_fp']:6.3f}x"
        )


def binary_conv(data):
    from bench_binary_conv import CUDA_COLUMNS, cuda_totals

    print(
        f"\nbinary conv 3x3 (ResNet-18 shapes), total ms, {data['device']}, ctmq CUDA kernels "
        f"{data.get('cuda_kernels')}; f = float in/out, p = packed in/out"
    )
    print(
        f"{'batch':>5s} " + " ".join(f"{h:>10s}" for _, h in CUDA_COLUMNS) + f" {'p vs bf16':>9s}"
    )
    rows = data["rows"]
    for b in sorted({r["batch"] for r in rows}):
        total = cuda_totals(rows, b)
        packed = [v for k, v in total.items() if k.endswith("_packed_ms")]
        ratio = (
            f" {total['cudnn_bf16_ms'] / min(packed):8.2f}x"
            if packed and "cudnn_bf16_ms" in total
            else ""
        )
        print(
            f"{b:5d} "
            + " ".join(
                f"{total[k]:10.3f}" if k in total else f"{'-':>10s}" for k, _ in CUDA_COLUMNS
            )
            + ratio
        )
    for r in rows:
        for k in r:
            if k.endswith("_error"):
                print(f"  {r['shape']} b{r['batch']}: {k[:-6]} failed: {r[k][:200]}")


def deploy(data):
    print(f"\nbinarized zoo deploy, {data['device']}, vs torch {data['reference']}")
    for r in data["rows"]:
        head = f"{r.get('model', 'resnet18'):>10s} batch {r['batch']:4d}: {r['kernel']:6s}"
        if "error" in r:
            print(f"{head} failed: {r['error'][:200]}")
            continue
        print(
            f"{head} {r['ctmq_ms']:8.2f} ms ({r['ctmq_img_s']:8.0f} img/s), "
            f"torch {r['torch_ms']:8.2f} ms: {r['speedup']:.2f}x"
        )


def main(folder):
    folder = pathlib.Path(folder)
    shown = False
    for name, fn in (
        ("binary_conv.json", binary_conv),
        ("deploy.json", deploy),
        ("fake_quant.json", fake_quant),
        ("qat_step.json", qat_step),
    ):
        path = folder / name
        if path.exists():
            try:
                fn(json.loads(path.read_text()))
            except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:  # a stopped benchmark
                print(f"\n{name}: incomplete ({type(e).__name__}: {e})")
            shown = True
    if not shown:
        print(f"no benchmark results in {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
