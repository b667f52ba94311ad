"""Print the short table of a GPU suite run from the JSON files in a folder."""
import json
import pathlib
import sys


def fake_quant(data):
    rows = data["rows"]
    by = {(r["case"], r["impl"]): r for r in rows}
    print(f"\nfake-quant fwd+bwd, {data['device']}, {data['dtype']}, {data['numel']} elements; "
          f"copy {data['copy_gbps']:.0f} GB/s")
    print(f"{'case':26s} {'ctmq GB/s':>9s} {'of copy':>8s} {'vs eager':>9s} {'vs compile':>10s} "
          f"{'vs torch op':>11s}")
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = by[(case, "ctmq")]
        comp = by.get((case, "torch.compile(eager)"))
        op = by[(case, "torch.fake_quantize")]
        vs_comp = f"{comp['ms'] / ours['ms']:9.2f}x" if comp else f"{'-':>10s}"
        print(f"{case:26s} {ours['gbps']:9.0f} {ours['of_copy']:7.0%} {ours['vs_eager']:8.2f}x "
              f"{vs_comp} {op['ms'] / ours['ms']:10.2f}x")


def qat_step(data):
    print(f"\nResNet-18 train step, {data['device']}, batch {data['batch']}, "
          f"{data['image_size']}x{data['image_size']}, bf16 autocast, channels_last")
    print(f"{'mode':9s} {'stage':6s} {'quantizers':10s} {'ms':>8s} {'img/s':>8s} {'vs FP':>7s}")
    for r in data["rows"]:
        stage = "FP" if r["bits"] == 32 else f"W{r['bits']}A{r['bits']}"
        print(f"{r['mode']:9s} {stage:6s} {r['quantizers']:10s} {r['ms']:8.2f} {r['img_s']:8.0f} "
              f"{r['vs_fp']:6.3f}x")


def binary_conv(data):
    from bench_binary_conv import CUDA_COLUMNS
    print(f"\nbinary conv 3x3 (ResNet-18 shapes), total ms, {data['device']}, ctmq path {data['path']}; "
          "f = float in/out, p = packed in/out")
    print(f"{'batch':>5s} " + " ".join(f"{h:>10s}" for _, h in CUDA_COLUMNS) + f" {'p vs bf16':>9s}")
    for b in sorted({r["batch"] for r in data["rows"]}):
        mine = [r for r in data["rows"] if r["batch"] == b]
        total = {k: sum(r[k] for r in mine) for k, _ in CUDA_COLUMNS if all(k in r for r in mine)}
        best = min(v for k, v in total.items() if k.endswith("_packed_ms"))
        print(f"{b:5d} " + " ".join(f"{total[k]:10.3f}" if k in total else f"{'-':>10s}"
                                    for k, _ in CUDA_COLUMNS)
              + f" {total['cudnn_bf16_ms'] / best:8.2f}x")


def deploy(data):
    print(f"\nbinarized ResNet-18 deploy, {data['device']}, vs torch {data['reference']}")
    for r in data["rows"]:
        print(f"batch {r['batch']:4d}: ctmq {r['ctmq_ms']:8.2f} ms ({r['ctmq_img_s']:8.0f} img/s), "
              f"torch {r['torch_ms']:8.2f} ms: {r['speedup']:.2f}x")
        if "bmma_ms" in r:
            print(f"{'':11s}bmma {r['bmma_ms']:8.2f} ms ({r['bmma_img_s']:8.0f} img/s): "
                  f"{r['bmma_speedup']:.2f}x")


def main(folder):
    folder = pathlib.Path(folder)
    shown = False
    for name, fn in (("fake_quant.json", fake_quant), ("qat_step.json", qat_step),
                     ("binary_conv.json", binary_conv), ("deploy.json", deploy)):
        path = folder / name
        if path.exists():
            fn(json.loads(path.read_text()))
            shown = True
    if not shown:
        print(f"no benchmark results in {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
