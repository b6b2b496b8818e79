// ResNet convolutions and training-mode BatchNorm on the CPU through oneDNN, as XLA FFI calls.
//
// Layouts are those of cmil_jax's ResNets: activations NHWC (B, H, W, C), conv kernels HWIO
// (kh, kw, in, out), float32. Activations are read and written in place (oneDNN's NHWC
// kernels); conv kernels are reordered to and from the layout oneDNN prefers. Primitives are
// built once per shape and kept in a process-wide cache; calls run one at a time.
//
// Convolutions (no bias), one call per pass:
//   cmil_onednn_conv_fwd          (x, w)  -> y
//   cmil_onednn_conv_bwd_data     (dy, w) -> dx      (the result's shape gives dx's)
//   cmil_onednn_conv_bwd_weights  (x, dy) -> dw
//   attributes: stride, dilation, pad_lo_h, pad_hi_h, pad_lo_w, pad_hi_w (int64).
// BatchNorm over the batch statistics (training), optionally followed by a ReLU:
//   cmil_onednn_bn_fwd  (x, scale, shift)                  -> y, mean, var (biased), ws
//   cmil_onednn_bn_bwd  (x, dy, mean, var, scale, ws)      -> dx, dscale, dshift
//   attributes: eps (float), relu (bool). ws is oneDNN's ReLU mask (u8; one byte when relu
//   is off); cmil_onednn_bn_workspace_bytes gives its size.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

std::mutex cache_mutex;

// One oneDNN call at a time. XLA may run two custom calls on two of its threads at once; each
// would start its own OpenMP team over the same cores, and oneDNN (built without concurrent
// execution) shares its scratchpad between primitives: two calls at once hung a training run
// inside two OpenMP regions. Each call already uses every core.
std::mutex execute_mutex;

// Looks `key` up in `cache`, building the entry with `build()` the first time.
template <typename Key, typename Entry, typename Build>
std::shared_ptr<Entry> Cached(std::map<Key, std::shared_ptr<Entry>>& cache, const Key& key,
                              Build build) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto entry = build();
  cache.emplace(key, entry);
  return entry;
}

// A buffer for a conv kernel in oneDNN's layout, one per thread, grown as needed.
void* KernelScratch(size_t bytes) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

ffi::Error Failed(const dnnl::error& err) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
}

// ---------------------------------------------------------------------------------------------
// Convolutions.

// (pass, B, H, W, C, O, kh, kw, stride, dilation, pads) identifies a primitive.
using ConvKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Geometry {
  int64_t b, h, w, c, o, kh, kw, stride, dilation, plh, phh, plw, phw;
  int64_t oh() const { return (h + plh + phh - dilation * (kh - 1) - 1) / stride + 1; }
  int64_t ow() const { return (w + plw + phw - dilation * (kw - 1) - 1) / stride + 1; }
  memory::desc src() const { return {{b, c, h, w}, dt::f32, tag::nhwc}; }
  memory::desc dst() const { return {{b, o, oh(), ow()}, dt::f32, tag::nhwc}; }
  memory::desc wei(tag t) const { return {{o, c, kh, kw}, dt::f32, t}; }
  memory::dims strides() const { return {stride, stride}; }
  memory::dims dilates() const { return {dilation - 1, dilation - 1}; }  // oneDNN counts from 0
  memory::dims pad_lo() const { return {plh, plw}; }
  memory::dims pad_hi() const { return {phh, phw}; }
  ConvKey key(int pass) const {
    return {pass, b, h, w, c, o, kh, kw, stride, dilation, plh, phh, plw, phw};
  }
};

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.src(), g.wei(tag::any), g.dst(), g.strides(), g.dilates(), g.pad_lo(), g.pad_hi());
}

// A conv primitive with the kernel reorder it needs (to oneDNN's layout, or back to HWIO).
struct ConvEntry {
  dnnl::primitive conv;
  memory::desc kernel_md;  // the kernel layout the primitive uses
  bool reorder;            // kernel_md differs from HWIO
  dnnl::reorder kernel_reorder;
};

std::shared_ptr<ConvEntry> BuildConv(int pass, const Geometry& g) {
  auto entry = std::make_shared<ConvEntry>();
  memory::desc hwio = g.wei(tag::hwio);
  auto fwd = ForwardDesc(g);
  if (pass == 0) {
    entry->conv = dnnl::convolution_forward(fwd);
    entry->kernel_md = fwd.weights_desc();
  } else if (pass == 1) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.wei(tag::any), g.dst(),
        g.strides(), g.dilates(), g.pad_lo(), g.pad_hi(), fwd);
    entry->conv = dnnl::convolution_backward_data(pd);
    entry->kernel_md = pd.weights_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.wei(tag::any), g.dst(),
        g.strides(), g.dilates(), g.pad_lo(), g.pad_hi(), fwd);
    entry->conv = dnnl::convolution_backward_weights(pd);
    entry->kernel_md = pd.diff_weights_desc();
  }
  entry->reorder = entry->kernel_md != hwio;
  if (entry->reorder) {
    auto pd = pass == 2 ? dnnl::reorder::primitive_desc(Engine(), entry->kernel_md, Engine(), hwio)
                        : dnnl::reorder::primitive_desc(Engine(), hwio, Engine(), entry->kernel_md);
    entry->kernel_reorder = dnnl::reorder(pd);
  }
  return entry;
}

// pass 0: src = x, dst = y; pass 1: src = dx, dst = dy; pass 2: src = x, dst = dy, wei = dw.
ffi::Error RunConv(int pass, const Geometry& g, void* src, void* wei, void* dst) {
  static std::map<ConvKey, std::shared_ptr<ConvEntry>> cache;
  try {
    auto e = Cached(cache, g.key(pass), [&] { return BuildConv(pass, g); });
    std::lock_guard<std::mutex> lock(execute_mutex);
    auto& s = Stream();
    memory src_m(g.src(), Engine(), src), dst_m(g.dst(), Engine(), dst);
    memory hwio_m(g.wei(tag::hwio), Engine(), wei);
    memory kernel_m = hwio_m;
    if (e->reorder) {
      kernel_m = memory(e->kernel_md, Engine(), KernelScratch(e->kernel_md.get_size()));
    }
    if (pass == 0) {
      if (e->reorder) e->kernel_reorder.execute(s, hwio_m, kernel_m);
      e->conv.execute(s, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, kernel_m},
                          {DNNL_ARG_DST, dst_m}});
    } else if (pass == 1) {
      if (e->reorder) e->kernel_reorder.execute(s, hwio_m, kernel_m);
      e->conv.execute(s, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, kernel_m},
                          {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      e->conv.execute(s, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, kernel_m},
                          {DNNL_ARG_DIFF_DST, dst_m}});
      if (e->reorder) e->kernel_reorder.execute(s, kernel_m, hwio_m);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return Failed(err);
  }
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> hwio, int64_t stride,
                      int64_t dilation, int64_t plh, int64_t phh, int64_t plw, int64_t phw) {
  return {x[0], x[1], x[2], x[3], hwio[3], hwio[0], hwio[1], stride, dilation, plh, phh, plw, phw};
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t dilation,
                       int64_t plh, int64_t phh, int64_t plw, int64_t phw) {
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), stride, dilation, plh, phh, plw, phw);
  return RunConv(0, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t dilation,
                            int64_t plh, int64_t phh, int64_t plw, int64_t phw) {
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), stride, dilation, plh, phh, plw, phw);
  return RunConv(1, g, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t dilation,
                               int64_t plh, int64_t phh, int64_t plw, int64_t phw) {
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), stride, dilation, plh, phh, plw, phw);
  return RunConv(2, g, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

// ---------------------------------------------------------------------------------------------
// BatchNorm (+ ReLU), training mode.

using BnKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, float, bool>;

struct BnShape {
  int64_t b, h, w, c;
  float eps;
  bool relu;
  memory::desc data() const { return {{b, c, h, w}, dt::f32, tag::nhwc}; }
  memory::desc channel() const { return {{c}, dt::f32, tag::a}; }
  dnnl::normalization_flags flags() const {
    auto f = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    return relu ? f | dnnl::normalization_flags::fuse_norm_relu : f;
  }
  BnKey key(int pass) const { return {pass, b, h, w, c, eps, relu}; }
};

struct BnEntry {
  dnnl::primitive bn;
  memory::desc workspace_md;
};

dnnl::batch_normalization_forward::primitive_desc BnForwardDesc(const BnShape& s) {
  return dnnl::batch_normalization_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, s.data(), s.data(), s.eps, s.flags());
}

std::shared_ptr<BnEntry> GetBn(int pass, const BnShape& s) {
  static std::map<BnKey, std::shared_ptr<BnEntry>> cache;
  return Cached(cache, s.key(pass), [&] {
    auto entry = std::make_shared<BnEntry>();
    auto fwd = BnForwardDesc(s);
    entry->workspace_md = fwd.workspace_desc();
    if (pass == 0) {
      entry->bn = dnnl::batch_normalization_forward(fwd);
    } else {
      entry->bn = dnnl::batch_normalization_backward(dnnl::batch_normalization_backward::primitive_desc(
          Engine(), dnnl::prop_kind::backward, s.data(), s.data(), s.data(), s.eps, s.flags(),
          fwd));
    }
    return entry;
  });
}

// Runs one BatchNorm primitive under the execution lock.
void ExecuteBn(const BnEntry& e, const std::unordered_map<int, memory>& args) {
  std::lock_guard<std::mutex> lock(execute_mutex);
  e.bn.execute(Stream(), args);
  Stream().wait();
}

ffi::Error BnForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                     ffi::ResultBuffer<ffi::U8> ws, float eps, bool relu) {
  auto d = x.dimensions();
  BnShape sh{d[0], d[1], d[2], d[3], eps, relu};
  try {
    auto e = GetBn(0, sh);
    if (relu && ws->size_bytes() < e->workspace_md.get_size()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "BatchNorm workspace too small");
    }
    auto eng = Engine();
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(sh.data(), eng, x.untyped_data())},
        {DNNL_ARG_DST, memory(sh.data(), eng, y->untyped_data())},
        {DNNL_ARG_SCALE, memory(sh.channel(), eng, scale.untyped_data())},
        {DNNL_ARG_SHIFT, memory(sh.channel(), eng, shift.untyped_data())},
        {DNNL_ARG_MEAN, memory(sh.channel(), eng, mean->untyped_data())},
        {DNNL_ARG_VARIANCE, memory(sh.channel(), eng, var->untyped_data())}};
    if (relu) args.insert({DNNL_ARG_WORKSPACE, memory(e->workspace_md, eng, ws->untyped_data())});
    ExecuteBn(*e, args);
  } catch (const dnnl::error& err) {
    return Failed(err);
  }
  return ffi::Error::Success();
}

ffi::Error BnBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mean,
                      ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::U8> ws, ffi::ResultBuffer<ffi::F32> dx,
                      ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift,
                      float eps, bool relu) {
  auto d = x.dimensions();
  BnShape sh{d[0], d[1], d[2], d[3], eps, relu};
  try {
    auto e = GetBn(1, sh);
    auto eng = Engine();
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(sh.data(), eng, x.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(sh.data(), eng, dy.untyped_data())},
        {DNNL_ARG_MEAN, memory(sh.channel(), eng, mean.untyped_data())},
        {DNNL_ARG_VARIANCE, memory(sh.channel(), eng, var.untyped_data())},
        {DNNL_ARG_SCALE, memory(sh.channel(), eng, scale.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(sh.data(), eng, dx->untyped_data())},
        {DNNL_ARG_DIFF_SCALE, memory(sh.channel(), eng, dscale->untyped_data())},
        {DNNL_ARG_DIFF_SHIFT, memory(sh.channel(), eng, dshift->untyped_data())}};
    if (relu) args.insert({DNNL_ARG_WORKSPACE, memory(e->workspace_md, eng, ws.untyped_data())});
    ExecuteBn(*e, args);
  } catch (const dnnl::error& err) {
    return Failed(err);
  }
  return ffi::Error::Success();
}

}  // namespace

// Bytes of the ReLU mask of a BatchNorm + ReLU over (b, h, w, c), or -1 on error (ctypes).
extern "C" int64_t cmil_onednn_bn_workspace_bytes(int64_t b, int64_t h, int64_t w, int64_t c) {
  try {
    return static_cast<int64_t>(BnForwardDesc({b, h, w, c, 1e-5f, true}).workspace_desc().get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}

#define CMIL_CONV_BINDING                      \
  ffi::Ffi::Bind()                             \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Ret<ffi::Buffer<ffi::F32>>()            \
      .Attr<int64_t>("stride")                 \
      .Attr<int64_t>("dilation")               \
      .Attr<int64_t>("pad_lo_h")               \
      .Attr<int64_t>("pad_hi_h")               \
      .Attr<int64_t>("pad_lo_w")               \
      .Attr<int64_t>("pad_hi_w")

XLA_FFI_DEFINE_HANDLER_SYMBOL(cmil_onednn_conv_fwd, ConvForward, CMIL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(cmil_onednn_conv_bwd_data, ConvBackwardData, CMIL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(cmil_onednn_conv_bwd_weights, ConvBackwardWeights,
                              CMIL_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cmil_onednn_bn_fwd, BnForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::U8>>()   // ws
                                  .Attr<float>("eps")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cmil_onednn_bn_bwd, BnBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::U8>>()   // ws
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dshift
                                  .Attr<float>("eps")
                                  .Attr<bool>("relu"));
