"""Minibatch discrimination (Salimans et al. 2016 §3.2) as a discriminator layer, initialised as in the authors'
code (openai/improved-gan, ``nn.MinibatchLayer``) and computed by a fused CPU kernel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ganlab.tricks.base import LayerInsert, Player, Trick

log = logging.getLogger(__name__)

SCALE_BY = ("nearest", "mean", "none")  # the first batch's distance that sets T's scale (MinibatchDiscrimination)


def check_args(n_kernels: int, kernel_dim: int, scale_by: str, where: str) -> None:
    """One-line ``ValueError`` (naming ``where``) for sizes below 1 or an unknown ``scale_by``."""
    if n_kernels < 1 or kernel_dim < 1:
        raise ValueError(f"{where}: n_kernels and kernel_dim must be >= 1 (got {n_kernels}, {kernel_dim})")
    if scale_by not in SCALE_BY:
        raise ValueError(f"{where}: scale_by must be one of {', '.join(SCALE_BY)} (got {scale_by!r})")


# -- the similarity o(x) and its gradient ---------------------------------------------------------------------
#
# With M in R^{B x C x n} (kernel b, coordinate c, example i):
#   o_bi = sum_{j != i} c_bij,   c_bij = exp(-d_bij),   d_bij = sum_c |M_bci - M_bcj|
#   dL/dM_bck = -sum_j (g_bk + g_bj) c_bkj sign(M_bck - M_bcj)          (g = dL/do; c and d are symmetric)
# Every pair (k, j) contributes to both k and j, so one pass over the n(n-1)/2 pairs of each kernel computes
# either. The C++ below does exactly that (kernels split over threads by at::parallel_for): the distances of the
# n(n-1)/2 pairs (for C <= 8 the C coordinates summed in registers, C a compile-time constant), then ATen's
# vectorised exp, then the sums; the backward reuses each pair's exp(-d) (B n(n-1)/2 numbers, freed with the
# graph). GCC builds the loops for AVX2 and for the x86-64 baseline and the loader picks one per machine.
#
# Measured on one thread at n = 256, A = 128, the whole layer's forward+backward (python -m ganlab.bench):
# torch.cdist(p=1) + autograd took 66.5 ms at B = 100, C = 5 and 7.1 ms at B = 10, C = 3, most of it cdist's
# generic p-norm backward; no composition of eager ops was faster (a chunked custom backward with sign() and
# einsum measured the same as cdist; torch.compile took 45 s to compile and was no faster). The first version of
# this kernel: 26.9 and 3.4 ms; this one (AVX2 clones, C in registers, T applied by one matmul): see the README.

_CPP = r"""
// The few ATen headers the kernel uses, not <torch/extension.h>: that one header took 77 s of a ~100 s build on
// 2 busy cores, these 14 s. The ops are registered with the dispatcher (torch.ops.ganlab_md), so no pybind11.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>
#include <tuple>
#include <cmath>
#include <limits>
#include <vector>

// GCC on x86-64 builds each hot loop twice, for AVX2 and for the baseline, and the loader picks one per machine
// (an ifunc): the cached build runs on any x86-64 CPU and uses AVX2 where there is one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MD_CLONES
#endif
#define MD_INLINE inline __attribute__((always_inline))

// One kernel b of m [B, C, n]: x = m_b (C rows of n), d = the pairs j > k in row order (k = 0: j = 1..n-1, then
// k = 1: j = 2..n-1, ...). CC > 0 is C known at compile time: the C coordinates of a pair are summed in registers
// (unrolled) in one pass over j; CC = 0 is any C: one pass over j per coordinate.

// d_kj = -sum_c |x_ck - x_cj|, and -inf where exp(d) would fall below the smallest normal number (an error under
// 2e-35 for float): denormal results would make exp and every product with them 10-100x slower on x86.
template <typename T, int CC>
static MD_INLINE void neg_distances_t(const T* __restrict__ x, T* __restrict__ d, int64_t C_, int64_t n) {
  const int64_t C = CC > 0 ? CC : C_;
  const T cut = sizeof(T) == 4 ? T(80) : T(700);
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k + 1 < n; ++k) {
    const int64_t r = n - k - 1;
    if (CC > 0) {
      T xk[CC > 0 ? CC : 1];
      for (int c = 0; c < CC; ++c) xk[c] = x[c * n + k];
      for (int64_t j = 0; j < r; ++j) {
        T s = 0;
#pragma GCC unroll 16
        for (int c = 0; c < CC; ++c) s += std::abs(xk[c] - x[c * n + k + 1 + j]);
        d[j] = s > cut ? -inf : -s;
      }
    } else {
      for (int64_t j = 0; j < r; ++j) d[j] = 0;
      for (int64_t c = 0; c < C; ++c) {
        const T xk = x[c * n + k];
        const T* xc = x + c * n + k + 1;
        for (int64_t j = 0; j < r; ++j) d[j] += std::abs(xk - xc[j]);
      }
      for (int64_t j = 0; j < r; ++j) d[j] = d[j] > cut ? -inf : -d[j];
    }
    d += r;
  }
}

// o_i += sum_{j != i} e_ij (o zeroed by the caller).
template <typename T>
static MD_INLINE void pair_sums_t(const T* __restrict__ e, T* __restrict__ o, int64_t n) {
  for (int64_t k = 0; k + 1 < n; ++k) {
    const int64_t r = n - k - 1;
    T* oj = o + k + 1;
    T acc = 0;
    for (int64_t j = 0; j < r; ++j) {
      acc += e[j];
      oj[j] += e[j];
    }
    o[k] += acc;
    e += r;
  }
}

// grad_ck += -sum_j (g_k + g_j) e_kj sign(x_ck - x_cj), each pair visited once (grad zeroed by the caller;
// d/dx_cj of -|x_ck - x_cj| is +sign(x_ck - x_cj)).
template <typename T, int CC>
static MD_INLINE void backward_t(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ e,
                                 T* __restrict__ grad, T* __restrict__ v, int64_t C_, int64_t n) {
  const int64_t C = CC > 0 ? CC : C_;
  for (int64_t k = 0; k + 1 < n; ++k) {
    const int64_t r = n - k - 1;
    const T gk = g[k];
    const T* gj = g + k + 1;
    if (CC > 0) {
      T xk[CC > 0 ? CC : 1], acc[CC > 0 ? CC : 1];
      for (int c = 0; c < CC; ++c) {
        xk[c] = x[c * n + k];
        acc[c] = 0;
      }
      for (int64_t j = 0; j < r; ++j) {
        const T w = (gk + gj[j]) * e[j];
#pragma GCC unroll 16
        for (int c = 0; c < CC; ++c) {
          const T xj = x[c * n + k + 1 + j];
          const T t = w * (T(xk[c] > xj) - T(xk[c] < xj));
          acc[c] += t;
          grad[c * n + k + 1 + j] += t;
        }
      }
      for (int c = 0; c < CC; ++c) grad[c * n + k] -= acc[c];
    } else {
      for (int64_t j = 0; j < r; ++j) v[j] = (gk + gj[j]) * e[j];
      for (int64_t c = 0; c < C; ++c) {
        const T xk = x[c * n + k];
        const T* xc = x + c * n + k + 1;
        T* gc = grad + c * n + k + 1;
        T acc = 0;
        for (int64_t j = 0; j < r; ++j) {
          const T t = v[j] * (T(xk > xc[j]) - T(xk < xc[j]));
          acc += t;
          gc[j] += t;
        }
        grad[c * n + k] -= acc;
      }
    }
    e += r;
  }
}

// Non-template entry points (target_clones needs them), one per type and compile-time C, in a table by C.
#define MD_ENTRIES(T, CC)                                                                                      \
  MD_CLONES static void dist_##T##_##CC(const T* x, T* d, int64_t C, int64_t n) {                              \
    neg_distances_t<T, CC>(x, d, C, n);                                                                        \
  }                                                                                                            \
  MD_CLONES static void back_##T##_##CC(const T* x, const T* g, const T* e, T* gr, T* v, int64_t C, int64_t n) { \
    backward_t<T, CC>(x, g, e, gr, v, C, n);                                                                   \
  }
#define MD_TYPE(T)                                                                                             \
  MD_ENTRIES(T, 0) MD_ENTRIES(T, 1) MD_ENTRIES(T, 2) MD_ENTRIES(T, 3) MD_ENTRIES(T, 4) MD_ENTRIES(T, 5)        \
  MD_ENTRIES(T, 6) MD_ENTRIES(T, 7) MD_ENTRIES(T, 8)                                                           \
  MD_CLONES static void sums_##T(const T* e, T* o, int64_t n) { pair_sums_t<T>(e, o, n); }                     \
  static void (*const dist_##T[9])(const T*, T*, int64_t, int64_t) = {                                         \
      dist_##T##_0, dist_##T##_1, dist_##T##_2, dist_##T##_3, dist_##T##_4,                                    \
      dist_##T##_5, dist_##T##_6, dist_##T##_7, dist_##T##_8};                                                 \
  static void (*const back_##T[9])(const T*, const T*, const T*, T*, T*, int64_t, int64_t) = {                 \
      back_##T##_0, back_##T##_1, back_##T##_2, back_##T##_3, back_##T##_4,                                    \
      back_##T##_5, back_##T##_6, back_##T##_7, back_##T##_8};
MD_TYPE(float)
MD_TYPE(double)

template <typename T> struct Entries;
template <> struct Entries<float> {
  static auto dist(int64_t C) { return dist_float[C <= 8 ? C : 0]; }
  static auto back(int64_t C) { return back_float[C <= 8 ? C : 0]; }
  static constexpr auto sums = sums_float;
};
template <> struct Entries<double> {
  static auto dist(int64_t C) { return dist_double[C <= 8 ? C : 0]; }
  static auto back(int64_t C) { return back_double[C <= 8 ? C : 0]; }
  static constexpr auto sums = sums_double;
};

// m: [B, C, n] contiguous. Returns (o [B, n], e [B, n (n - 1) / 2]): e_bkj = exp(-sum_c |m_bck - m_bcj|) for the
// pairs j > k in row order, and o_bi = sum_{j != i} e_b{ij}.
std::tuple<at::Tensor, at::Tensor> md_forward(const at::Tensor& m) {
  const int64_t B = m.size(0), C = m.size(1), n = m.size(2), P = n * (n - 1) / 2;
  auto e = at::empty({B, P}, m.options());
  auto o = at::zeros({B, n}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "md_forward", [&] {
    const scalar_t* x = m.data_ptr<scalar_t>();
    scalar_t* ep = e.data_ptr<scalar_t>();
    const auto dist = Entries<scalar_t>::dist(C);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) dist(x + b * C * n, ep + b * P, C, n);
    });
    e.exp_();  // ATen's vectorised exp over every pair
    scalar_t* op = o.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) Entries<scalar_t>::sums(ep + b * P, op + b * n, n);
    });
  });
  return std::make_tuple(o, e);
}

// g = dL/do: [B, n]; e from md_forward. Returns dL/dm: [B, C, n].
at::Tensor md_backward(const at::Tensor& m, const at::Tensor& g, const at::Tensor& e) {
  const int64_t B = m.size(0), C = m.size(1), n = m.size(2), P = n * (n - 1) / 2;
  auto grad = at::zeros_like(m);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "md_backward", [&] {
    const scalar_t* x = m.data_ptr<scalar_t>();
    const scalar_t* gg = g.data_ptr<scalar_t>();
    const scalar_t* ep = e.data_ptr<scalar_t>();
    scalar_t* gr = grad.data_ptr<scalar_t>();
    const auto back = Entries<scalar_t>::back(C);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> v(n);  // the runtime-C path's per-row weights
      for (int64_t b = b0; b < b1; ++b) back(x + b * C * n, gg + b * n, ep + b * P, gr + b * C * n, v.data(), C, n);
    });
  });
  return grad;
}

TORCH_LIBRARY(ganlab_md, lib) {
  lib.def("md_forward(Tensor m) -> (Tensor, Tensor)");
  lib.def("md_backward(Tensor m, Tensor g, Tensor e) -> Tensor");
}
TORCH_LIBRARY_IMPL(ganlab_md, CPU, lib) {
  lib.impl("md_forward", &md_forward);
  lib.impl("md_backward", &md_backward);
}
"""

_kernel_state: dict[str, Any] = {}
# reassociation lets gcc vectorise the sums; no -ffast-math: the kernel relies on infinities
_CFLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


def _kernel() -> Any | None:
    """The compiled CPU kernel (built once per source and cached by torch in ``$TORCH_EXTENSIONS_DIR``), or None
    where it cannot be built (no C++ compiler): the layer then runs :func:`similarity_reference`."""
    if "module" not in _kernel_state:
        try:
            from torch.utils.cpp_extension import load_inline

            load_inline(
                name="ganlab_minibatch_discrimination",
                cpp_sources=[_CPP],
                extra_cflags=_CFLAGS,
                no_implicit_headers=True,  # _CPP includes what it needs (a 5x faster first build)
                is_python_module=False,  # loaded as a library: its ops register as torch.ops.ganlab_md.*
                verbose=False,
            )
            _kernel_state["module"] = torch.ops.ganlab_md
        except Exception as err:
            log.warning("minibatch discrimination: no compiled kernel (%s); using the slower torch.cdist path", err)
            _kernel_state["module"] = None
    return _kernel_state["module"]


class _Similarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, m: Tensor) -> Tensor:  # m [B, C, n] -> o [B, n]
        o, e = _kernel().md_forward(m)  # e [B, n(n-1)/2]: each pair's exp(-d)
        ctx.save_for_backward(m, e)  # the backward needs each pair's exp(-d) and sign(m_k - m_j) only
        return o

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        m, e = ctx.saved_tensors
        return _kernel().md_backward(m, g.contiguous(), e)


def similarity_reference(m: Tensor) -> Tensor:
    """``o [B, n]`` from ``m [B, C, n]`` with ``torch.cdist(p=1)``: any device, autograd's backward."""
    mt = m.transpose(1, 2)  # [B, n, C]
    return torch.exp(-torch.cdist(mt, mt, p=1)).sum(dim=2) - 1.0  # the diagonal is exp(0) = 1


def similarity(m: Tensor) -> Tensor:
    """``o_bi = sum_{j != i} exp(-||m_b:i - m_b:j||_1)`` for ``m [B, C, n]``: the fused kernel on CPU (float32 and
    float64), :func:`similarity_reference` elsewhere (a GPU runs cdist fast enough)."""
    if m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64) and _kernel() is not None:
        return _Similarity.apply(m.contiguous())
    return similarity_reference(m)


class MinibatchDiscrimination(nn.Module):
    """Append to each example's features a measure of how close it is to the other examples of its batch.

    With ``f(x_i) in R^A`` (the incoming features) and a learned ``T in R^{A x B x C}``:
    ``M_i = f(x_i) T in R^{B x C}``, ``c_b(x_i, x_j) = exp(-||M_{i,b} - M_{j,b}||_1)`` and
    ``o(x_i)_b = sum_{j != i} c_b(x_i, x_j) + bias_b``. On a conv map ``[n, A, h, w]``, ``f`` is the map averaged
    over its positions (A = its channels), as in the authors' code, whose ``MinibatchLayer`` follows a
    ``GlobalPoolLayer``: T has A x B x C entries, not (A h w) x B x C (on digits 64,000 against 1,024,000, a D of
    8.7x the other arms' parameters). The output is the flat ``[x_i, o(x_i)]``, the input flattened once and
    ``o`` concatenated once (``[n, A h w + B]``; broadcasting ``o`` over h x w positions instead would give the
    next layer each value h*w times: h*w times its effective scale and learning rate), so the head reads what it
    reads in every other arm, plus ``o``. ``flat_output`` says so to the network
    (:meth:`ganlab.nets.base.Discriminator._build`).

    ``parts`` (set by :func:`ganlab.nets.base.batch_parts`; None: one batch) splits the batch into consecutive
    parts whose examples are compared only within their part: feature matching's one D pass over
    ``[real; fake]`` gives each half the features two passes would.

    The authors' initialisation (improved-gan's ``MinibatchLayer``): ``T`` is weight-normalised,
    ``T[:, b, c] = exp(log_scale[b, c]) * theta[:, b, c] / ||theta[:, b, c]||``, ``theta ~ N(0, init_std^2)``;
    on the first training batch (real data) ``log_scale`` is set so that half the mean distance of an example to
    its nearest neighbour is 1 in every kernel (``scale_by="nearest"``), and ``bias`` to minus the mean of ``o``,
    so the new features start centred and neither dead (all ``c`` ~ 0) nor saturated (all ``c`` ~ 1).
    ``initialised`` is a buffer: a resumed run does not initialise again.

    ``scale_by="mean"`` sets half the mean distance between all pairs of the batch to 1 instead. On data made of
    tight clusters (the 2-D mixtures: 32 points of a ring8 batch share a mode of std 0.01) the nearest neighbour
    is a same-mode point, so the authors' rule scales the kernels to resolve the data's noise (x5,000 on ring8):
    D then separates real from fake by their local density at that scale, where G's gradient carries no useful
    direction, and wins outright (measured: ring8, 10,000 steps, D(x) 1.00 / D(G(z)) 0.01 from step 2,500).
    The mean distance is the scale of the modes' layout, the one G has to get right. ``scale_by="none"`` skips
    the data-dependent step (unit-norm columns of ``T``, bias -1: the authors' constant initialisers).
    """

    flat_output = True  # [n, A + B] out, for flat or conv input alike

    def __init__(
        self,
        in_features: int,
        n_kernels: int = 100,
        kernel_dim: int = 5,
        init_std: float = 0.05,
        scale_by: str = "nearest",
    ) -> None:
        super().__init__()
        check_args(n_kernels, kernel_dim, scale_by, "minibatch discrimination")
        self.scale_by = scale_by
        self.in_features, self.n_kernels, self.kernel_dim = in_features, n_kernels, kernel_dim
        self.extra_features = n_kernels  # what the layer appends: B similarity features
        self.theta = nn.Parameter(torch.randn(in_features, n_kernels, kernel_dim) * init_std)  # [A, B, C]
        self.log_scale = nn.Parameter(torch.zeros(n_kernels, kernel_dim))  # [B, C]
        self.bias = nn.Parameter(torch.full((n_kernels,), -1.0))  # [B]
        self.register_buffer("initialised", torch.tensor(scale_by == "none"))
        self._ready = False  # cached: initialised is known to be True
        self.parts: tuple[int, ...] | None = None  # batch_parts: sizes of the parts compared apart

    @property
    def T(self) -> Tensor:
        """The weight-normalised tensor ``T [A, B, C]``."""
        return self.theta * (self.log_scale.exp() / self.theta.norm(dim=0))

    def kernels(self, x: Tensor) -> Tensor:
        """``M`` as ``[B, C, n]`` (kernel-major, what :func:`similarity` takes)."""
        f = x.mean(dim=(2, 3)) if x.dim() == 4 else x.reshape(x.shape[0], -1)  # [n, A]: a map's position average
        # (f T)^T as one matmul of transposed views: [B C, n] comes out contiguous, no permute or copy
        return torch.mm(self.T.reshape(self.in_features, -1).t(), f.t()).view(self.n_kernels, self.kernel_dim, -1)

    def similarity(self, x: Tensor) -> Tensor:
        """``o(x)``: ``[n, B]`` closeness of each example to the rest of the batch (bias included)."""
        # the buffer is read (a host sync) only until it is True; after that every D pass skips the check. The
        # buffer stays the record (a loaded checkpoint sets it), the flag only caches it.
        if self.training and not self._ready:
            if bool(self.initialised):
                self._ready = True
            else:
                self._initialise(x)
        m = self.kernels(x)
        if self.parts is None:
            return similarity(m).t() + self.bias
        return torch.cat([similarity(part) for part in m.split(list(self.parts), dim=2)], dim=1).t() + self.bias

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        m = self.kernels(x).transpose(1, 2)  # [B, n, C]
        if m.shape[1] < 2:
            return  # one example has no neighbour: wait for a real batch
        dist_ = torch.cdist(m, m, p=1)  # [B, n, n]
        n = m.shape[1]
        if self.scale_by == "mean":
            half = 0.5 * dist_.sum(dim=(1, 2)) / (n * (n - 1))  # [B]: half the mean over pairs j != i
        else:
            dist_.diagonal(dim1=1, dim2=2).fill_(float("inf"))
            half = 0.5 * dist_.min(dim=2).values.mean(dim=1)  # [B]: half the mean nearest-neighbour distance
        self.log_scale.sub_(half.clamp_min(1e-12).log()[:, None])
        o = similarity_reference(self.kernels(x))  # [B, n] under the new scale
        self.bias.copy_(-o.mean(dim=1))
        if dist.is_available() and dist.is_initialized():  # every rank starts from rank 0's initialisation
            dist.broadcast(self.log_scale.data, 0)
            dist.broadcast(self.bias.data, 0)
        self.initialised.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        o = self.similarity(x)  # [n, B]
        return torch.cat([x.reshape(x.shape[0], -1), o], dim=1)  # [n, A + B]

    def extra_repr(self) -> str:
        return f"A={self.in_features}, B={self.n_kernels}, C={self.kernel_dim}"


class MinibatchDiscriminationD(Trick):
    """``tricks=[minibatch_discrimination]``: a :class:`MinibatchDiscrimination` layer with ``n_kernels`` (B) and
    ``kernel_dim`` (C) after each of D's hidden ``layers`` (``-1``: the last hidden layer, as in Salimans et al.).

    The layer's output is flat, so on a conv D it can only follow the last hidden block (the network says so in
    one line otherwise); on an MLP D it may follow any hidden layer.
    """

    def __init__(
        self, layers: Sequence[int] = (-1,), n_kernels: int = 100, kernel_dim: int = 5, scale_by: str = "nearest"
    ) -> None:
        if len(layers) == 0:
            raise ValueError("tricks.minibatch_discrimination.layers must name at least one D layer")
        check_args(n_kernels, kernel_dim, scale_by, "tricks.minibatch_discrimination")
        self.layers, self.n_kernels, self.kernel_dim = [int(i) for i in layers], int(n_kernels), int(kernel_dim)
        self.scale_by = scale_by

    def _make(self, in_features: int) -> nn.Module:
        return MinibatchDiscrimination(in_features, self.n_kernels, self.kernel_dim, scale_by=self.scale_by)

    def network_args(self, player: Player) -> dict[str, Any]:
        return {"inserts": [LayerInsert(self.layers, self._make)]} if player == "D" else {}
