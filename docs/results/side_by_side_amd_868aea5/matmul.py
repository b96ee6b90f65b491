import time, torch
torch.set_num_threads(2)
for m in (1, 8, 190):
    a = torch.randn(m, 576); w = torch.randn(1536, 576)
    for _ in range(20): torch.nn.functional.linear(a, w)
    n = 2000 if m < 100 else 200
    t = time.perf_counter()
    for _ in range(n): torch.nn.functional.linear(a, w)
    dt = (time.perf_counter() - t) / n
    print(f"m={m}: {dt*1e6:.1f} us, {2*m*576*1536/dt/1e9:.1f} GFLOP/s")
