"""Issue-3 goals of the cpp CPU backend: fwd+bwd time and peak RSS of one marginal SupCon call,
D=128, fp32, margin 0.4. Usage: python benchmarks/cpp_cpu_goals.py N BACKEND (one process per run,
so peak RSS is that call's)."""
import sys, time, torch, ffkern, resource
n, backend = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
x = torch.randn(n // 2, 2, 128, requires_grad=True); y = torch.randint(0, 100, (n // 2,))
ffkern.marginal_supcon_loss(x[:8], y[:8], margin=0.4, backend=backend).backward()  # load / warm up
x.grad = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
loss = ffkern.marginal_supcon_loss(x, y, margin=0.4, backend=backend); loss.backward()
dt = time.perf_counter() - t
print(f"N={n} {backend}: loss {loss.item():.6f} fwd+bwd {dt:.2f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB (before: {base/1024:.0f} MB)")
