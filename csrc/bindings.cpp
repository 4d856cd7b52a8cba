// sparsekern._C: raw pointers (as Python ints) and sizes in, nothing torch-specific, so the
// extension does not depend on the installed torch's C++ ABI. Python validates every input
// (sparsekern/ops/*.py) before it reaches these entry points.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sparsekern/bn_relu.h"
#include "sparsekern/channel_absmax.h"
#include "sparsekern/cpu_dispatch.h"
#include "sparsekern_build_info.h"

namespace py = pybind11;
using sparsekern::DType;
using sparsekern::View4;

namespace {

View4 make_view(int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr, int64_t sl) {
  return View4{n, c, r, l, sn, sc, sr, sl};
}

DType make_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("sparsekern._C: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

#ifdef SPARSEKERN_WITH_CUDA
void check_cuda(const char* err, const char* op) {
  if (err && err[0]) throw std::runtime_error(std::string("sparsekern._C.") + op + ": " + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsekern compiled kernels (C++ CPU and, when built with nvcc, CUDA)";

#ifdef SPARSEKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef SPARSEKERN_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif

  m.def("build_info", []() {
    py::dict d;
    d["compiler"] = SPARSEKERN_COMPILER;
    d["pybind11"] = SPARSEKERN_PYBIND11_VERSION;
#ifdef SPARSEKERN_WITH_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["cpu_isas"] = sparsekern::cpu_isas_compiled();  // variants of the CPU kernels, best first
#ifdef SPARSEKERN_WITH_CUDA
    d["cuda"] = SPARSEKERN_CUDA_VERSION;
    d["cuda_archs"] = SPARSEKERN_CUDA_ARCHS;
#else
    d["cuda"] = py::none();
    d["cuda_archs"] = py::none();
#endif
    return d;
  });

  m.def("cpu_isa", &sparsekern::cpu_isa, "the variant of the CPU kernels in use (avx512, avx2, baseline or native)");
  m.def("cpu_isas_supported", &sparsekern::cpu_isas_supported,
        "the compiled variants of the CPU kernels that this CPU can run, best first");
  m.def("set_cpu_isa", &sparsekern::set_cpu_isa, py::arg("name"),
        "run the CPU kernels of variant `name` (auto: the best supported); ValueError if it cannot run here");
  sparsekern::cpu_isa();  // chooses the CPU kernel variant now, as the module loads (cpu_dispatch.h)

  // lo / hi (optional, both 0 or both set): the signed min / max per (n, c), from the same pass.
  m.def(
      "channel_absmax_cpu",
      [](uintptr_t x, int dtype, int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr,
         int64_t sl, uintptr_t out, uintptr_t pos, uintptr_t lo, uintptr_t hi) {
        if ((lo == 0) != (hi == 0)) throw std::invalid_argument("sparsekern._C.channel_absmax_cpu: give both lo and hi, or neither");
        sparsekern::channel_absmax_cpu(ptr<const void>(x), make_dtype(dtype), make_view(n, c, r, l, sn, sc, sr, sl),
                                       ptr<float>(out), ptr<int64_t>(pos), ptr<float>(lo), ptr<float>(hi), nullptr);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("c"), py::arg("r"), py::arg("l"), py::arg("sn"),
      py::arg("sc"), py::arg("sr"), py::arg("sl"), py::arg("out"), py::arg("pos"), py::arg("lo") = 0,
      py::arg("hi") = 0, py::call_guard<py::gil_scoped_release>());

  // The statistics update of one batch in one call (channel_absmax.h); maxima, histogram and the
  // two-pass pointers are optional (0). y (optional, float32 only): apply clamp(x, clamp_lo, clamp_hi)
  // in the same pass, store it there (x's strides; y == x in place) and measure it.
  m.def(
      "channel_stats_cpu",
      [](uintptr_t x, int dtype, int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr,
         int64_t sl, uintptr_t maxima, uintptr_t mx, uintptr_t nan_samples, uintptr_t inf_samples, uintptr_t positive,
         uintptr_t value_min, uintptr_t value_max, uintptr_t histogram, int64_t buckets, int hist_bits,
         uintptr_t reference, uintptr_t thresholds, int64_t num_thresholds, uintptr_t pass2_counts,
         uintptr_t pass2_max, uintptr_t y, float clamp_lo, float clamp_hi) {
        if (histogram && (hist_bits < 0 || hist_bits > 23 || buckets != (int64_t(255) << hist_bits) + 2))
          throw std::invalid_argument("sparsekern._C.channel_stats_cpu: buckets must be 255 * 2^hist_bits + 2");
        if (reference && (!thresholds || !pass2_counts || !pass2_max || num_thresholds < 1))
          throw std::invalid_argument("sparsekern._C.channel_stats_cpu: the two-pass pointers come together");
        if (y && make_dtype(dtype) != sparsekern::DType::kFloat32)
          throw std::invalid_argument("sparsekern._C.channel_stats_cpu: the clamp epilogue (y) takes float32 only");
        const sparsekern::Clamp clamp{clamp_lo, clamp_hi, ptr<void>(y)};
        sparsekern::channel_stats_cpu(
            ptr<const void>(x), make_dtype(dtype), make_view(n, c, r, l, sn, sc, sr, sl), ptr<float>(maxima),
            ptr<float>(mx), ptr<int64_t>(nan_samples), ptr<int64_t>(inf_samples), ptr<int64_t>(positive),
            ptr<float>(value_min), ptr<float>(value_max), ptr<int64_t>(histogram), buckets, hist_bits,
            ptr<const float>(reference), ptr<const double>(thresholds), num_thresholds, ptr<int64_t>(pass2_counts),
            ptr<float>(pass2_max), y ? &clamp : nullptr);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("c"), py::arg("r"), py::arg("l"), py::arg("sn"),
      py::arg("sc"), py::arg("sr"), py::arg("sl"), py::arg("maxima"), py::arg("mx"), py::arg("nan_samples"),
      py::arg("inf_samples"), py::arg("positive"), py::arg("value_min"), py::arg("value_max"), py::arg("histogram"),
      py::arg("buckets"), py::arg("hist_bits"), py::arg("reference"), py::arg("thresholds"),
      py::arg("num_thresholds"), py::arg("pass2_counts"), py::arg("pass2_max"), py::arg("y") = 0,
      py::arg("clamp_lo") = 0.0f, py::arg("clamp_hi") = 0.0f, py::call_guard<py::gil_scoped_release>());

#ifdef SPARSEKERN_WITH_CUDA
  m.def(
      "channel_stats_cuda",
      [](uintptr_t x, int dtype, int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr,
         int64_t sl, uintptr_t maxima, uintptr_t mx, uintptr_t nan_samples, uintptr_t inf_samples, uintptr_t positive,
         uintptr_t value_min, uintptr_t value_max, uintptr_t histogram, int64_t buckets, int hist_bits,
         uintptr_t reference, uintptr_t thresholds, int64_t num_thresholds, uintptr_t pass2_counts,
         uintptr_t pass2_max, uintptr_t stream) {
        if (histogram && (hist_bits < 0 || hist_bits > 23 || buckets != (int64_t(255) << hist_bits) + 2))
          throw std::invalid_argument("sparsekern._C.channel_stats_cuda: buckets must be 255 * 2^hist_bits + 2");
        if (reference && (!thresholds || !pass2_counts || !pass2_max || num_thresholds < 1))
          throw std::invalid_argument("sparsekern._C.channel_stats_cuda: the two-pass pointers come together");
        const char* err;
        {
          py::gil_scoped_release release;
          err = sparsekern::channel_stats_cuda(
              ptr<const void>(x), make_dtype(dtype), make_view(n, c, r, l, sn, sc, sr, sl), ptr<float>(maxima),
              ptr<float>(mx), ptr<int64_t>(nan_samples), ptr<int64_t>(inf_samples), ptr<int64_t>(positive),
              ptr<float>(value_min), ptr<float>(value_max), ptr<int64_t>(histogram), buckets, hist_bits,
              ptr<const float>(reference), ptr<const double>(thresholds), num_thresholds,
              ptr<int64_t>(pass2_counts), ptr<float>(pass2_max), ptr<void>(stream));
        }
        check_cuda(err, "channel_stats_cuda");
      });
#endif

  m.def(
      "maxima_checksum_cpu",
      [](uintptr_t m, int64_t count) { return sparsekern::maxima_checksum_cpu(ptr<const float>(m), count); },
      py::arg("m"), py::arg("count"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "bn_relu_cpu",
      [](uintptr_t x, int dtype, int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr,
         int64_t sl, uintptr_t scale, uintptr_t shift, uintptr_t dead, uintptr_t y, int64_t ysn, int64_t ysc,
         int64_t ysr, int64_t ysl, uintptr_t out_max, bool write_dead) {
        sparsekern::bn_relu_cpu(ptr<const void>(x), make_dtype(dtype), make_view(n, c, r, l, sn, sc, sr, sl),
                                ptr<const float>(scale), ptr<const float>(shift), ptr<const uint8_t>(dead),
                                write_dead, ptr<void>(y), make_view(n, c, r, l, ysn, ysc, ysr, ysl), ptr<float>(out_max));
      },
      py::call_guard<py::gil_scoped_release>());

#ifdef SPARSEKERN_WITH_CUDA
  m.def(
      "channel_absmax_cuda",
      [](uintptr_t x, int dtype, int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr,
         int64_t sl, uintptr_t out, uintptr_t pos, uintptr_t stream, uintptr_t lo, uintptr_t hi) {
        if ((lo == 0) != (hi == 0)) throw std::invalid_argument("sparsekern._C.channel_absmax_cuda: give both lo and hi, or neither");
        const char* err = nullptr;
        {
          py::gil_scoped_release release;
          err = sparsekern::channel_absmax_cuda(ptr<const void>(x), make_dtype(dtype),
                                                make_view(n, c, r, l, sn, sc, sr, sl), ptr<float>(out),
                                                ptr<int64_t>(pos), ptr<float>(lo), ptr<float>(hi), ptr<void>(stream));
        }
        check_cuda(err, "channel_absmax_cuda");
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("c"), py::arg("r"), py::arg("l"), py::arg("sn"),
      py::arg("sc"), py::arg("sr"), py::arg("sl"), py::arg("out"), py::arg("pos"), py::arg("stream"),
      py::arg("lo") = 0, py::arg("hi") = 0);
  m.def(
      "bn_relu_cuda",
      [](uintptr_t x, int dtype, int64_t n, int64_t c, int64_t r, int64_t l, int64_t sn, int64_t sc, int64_t sr,
         int64_t sl, uintptr_t scale, uintptr_t shift, uintptr_t dead, uintptr_t y, int64_t ysn, int64_t ysc,
         int64_t ysr, int64_t ysl, uintptr_t out_max, uintptr_t stream, bool write_dead) {
        const char* err = nullptr;
        {
          py::gil_scoped_release release;
          err = sparsekern::bn_relu_cuda(ptr<const void>(x), make_dtype(dtype), make_view(n, c, r, l, sn, sc, sr, sl),
                                         ptr<const float>(scale), ptr<const float>(shift), ptr<const uint8_t>(dead),
                                         write_dead, ptr<void>(y), make_view(n, c, r, l, ysn, ysc, ysr, ysl),
                                         ptr<float>(out_max), ptr<void>(stream));
        }
        check_cuda(err, "bn_relu_cuda");
      });
#endif
}
