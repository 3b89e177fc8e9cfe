"""Which host->GPU hand-over op waits for queued GPU work (to_device's failing test on the H100)."""
import time
import torch

dev = torch.device("cuda")
crops = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).pin_memory()
q_pinned = torch.tensor([10, 20]).pin_memory()
q_page = torch.tensor([10, 20])
ops = {
    "pinned uint8 .to(non_blocking)": lambda: crops.to(dev, non_blocking=True),
    "pinned uint8 .to + float().div_": lambda: crops.to(dev, non_blocking=True).float().div_(255),
    "pinned int64 .to(non_blocking)": lambda: q_pinned.to(dev, non_blocking=True),
    "pageable int64 .pin_memory()": lambda: q_page.pin_memory(),
    "pageable int64 .pin_memory().to": lambda: q_page.pin_memory().to(dev, non_blocking=True),
    "pageable int64 .to(non_blocking)": lambda: q_page.to(dev, non_blocking=True),
    "torch.as_tensor(list)": lambda: torch.as_tensor([10, 20], dtype=torch.int64),
    "is_pinned()": lambda: q_page.is_pinned(),
}
for name, op in ops.items():
    for trial in range(2):
        op(); torch.cuda.synchronize()
        torch.cuda._sleep(300_000_000)
        t = time.perf_counter(); op(); dt = time.perf_counter() - t
        busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        print(f"{name:40s} trial {trial}: host {dt * 1e3:8.2f} ms, GPU still busy after: {busy}", flush=True)
