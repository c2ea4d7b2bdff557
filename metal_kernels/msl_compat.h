// msl_compat.h: lets a Metal Shading Language kernel body, as written for
// mx.fast.metal_kernel, compile as CUDA under mx.fast.cuda_kernel.
//
// MLX pastes this text (followed by the kernel file's own header section)
// after its CUDA prelude (mlx/backend/cuda/device/utils.cuh, cuda_fp16.h,
// cuda_bf16.h, cooperative_groups.h) and before
//   namespace mlx::core::cu { __global__ void custom_kernel_NAME(...) { BODY } }
// It maps the Metal names a body may use to CUDA:
//   - types and address spaces: uint, device, constant, threadgroup;
//   - thread-position attributes (Metal passes them as kernel arguments, here
//     they are expressions over threadIdx / blockIdx / blockDim / gridDim);
//   - threadgroup_barrier(mem_flags::...), simd_sum / simd_max / simd_min,
//     simd_shuffle_xor / simd_shuffle / simd_broadcast (SIMD-group = warp of 32);
//   - as_type<uint>(float), as_type<float>(uint);
//   - metal:: math (float): rsqrt, sqrt, exp, exp2, log, log2, cos, sin, abs,
//     fabs, max, min, fma, and metal::precise:: / metal::fast:: variants.
// Only what the kernels in this package use is mapped: extend it as needed.
// Thread-position attributes assume the SIMD-group is 32 threads (Apple GPUs
// and NVIDIA warps both are) and threadgroups whose size is a multiple of 32.

// @provides uint
typedef unsigned int uint;

// @provides grid_pos grid_size tid_in_tg
namespace msl {
__device__ __forceinline__ uint3 grid_pos() {
  return make_uint3(blockIdx.x * blockDim.x + threadIdx.x,
                    blockIdx.y * blockDim.y + threadIdx.y,
                    blockIdx.z * blockDim.z + threadIdx.z);
}
__device__ __forceinline__ uint3 grid_size() {
  return make_uint3(gridDim.x * blockDim.x, gridDim.y * blockDim.y, gridDim.z * blockDim.z);
}
__device__ __forceinline__ uint tid_in_tg() {
  return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
}
}  // namespace msl

// @provides thread_position_in_grid
#define thread_position_in_grid (::msl::grid_pos())
// @provides threads_per_grid
#define threads_per_grid (::msl::grid_size())
// @provides thread_position_in_threadgroup
#define thread_position_in_threadgroup (threadIdx)
// @provides threads_per_threadgroup
#define threads_per_threadgroup (uint3(blockDim))
// @provides threadgroup_position_in_grid
#define threadgroup_position_in_grid (blockIdx)
// @provides threadgroups_per_grid
#define threadgroups_per_grid (uint3(gridDim))
// @provides thread_index_in_threadgroup
#define thread_index_in_threadgroup (::msl::tid_in_tg())
// @provides thread_index_in_simdgroup
#define thread_index_in_simdgroup (::msl::tid_in_tg() % 32u)
// @provides simdgroup_index_in_threadgroup
#define simdgroup_index_in_threadgroup (::msl::tid_in_tg() / 32u)
// @provides threads_per_simdgroup
#define threads_per_simdgroup (32u)
// @provides simdgroups_per_threadgroup
#define simdgroups_per_threadgroup ((blockDim.x * blockDim.y * blockDim.z + 31u) / 32u)

// @provides threadgroup_barrier mem_flags
// threadgroup_barrier(mem_flags::mem_threadgroup) and friends: a block barrier
// (which also orders shared and global memory for the block).
namespace mem_flags {
enum : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
}
__device__ __forceinline__ void threadgroup_barrier(int) { __syncthreads(); }
// @provides simdgroup_barrier
__device__ __forceinline__ void simdgroup_barrier(int) { __syncwarp(); }

// SIMD-group reductions and shuffles over the full warp. As in Metal, every
// lane of the SIMD-group must call them; the xor butterfly leaves the same
// (bitwise identical) result in every lane.
// @provides simd_sum
template <typename U>
__device__ __forceinline__ U simd_sum(U x) {
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}
// @provides simd_max
template <typename U>
__device__ __forceinline__ U simd_max(U x) {
  for (int m = 16; m > 0; m >>= 1) { U y = __shfl_xor_sync(0xffffffffu, x, m); x = y > x ? y : x; }
  return x;
}
// @provides simd_min
template <typename U>
__device__ __forceinline__ U simd_min(U x) {
  for (int m = 16; m > 0; m >>= 1) { U y = __shfl_xor_sync(0xffffffffu, x, m); x = y < x ? y : x; }
  return x;
}
// @provides simd_shuffle_xor
template <typename U>
__device__ __forceinline__ U simd_shuffle_xor(U x, unsigned short mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}
// @provides simd_shuffle
template <typename U>
__device__ __forceinline__ U simd_shuffle(U x, unsigned short lane) {
  return __shfl_sync(0xffffffffu, x, lane);
}
// @provides as_type
// as_type<uint>(float) and as_type<float>(uint): Metal's bit reinterpretation (threadgroup memory
// of one type holding another's values).
template <typename T, typename U> __device__ __forceinline__ T as_type(U x);
template <> __device__ __forceinline__ unsigned int as_type<unsigned int, float>(float x) { return __float_as_uint(x); }
template <> __device__ __forceinline__ float as_type<float, unsigned int>(unsigned int x) { return __uint_as_float(x); }
// @provides simd_broadcast
template <typename U>
__device__ __forceinline__ U simd_broadcast(U x, unsigned short lane) {
  return __shfl_sync(0xffffffffu, x, lane);
}

// metal:: math on float, one part per function (plain, precise:: and fast:: variants). MLX compiles
// custom kernels without --use_fast_math, so cosf/sinf/expf are the accurate versions (like
// metal::precise::).
// @provides rsqrt
namespace metal {
__device__ __forceinline__ float rsqrt(float x) { return ::rsqrtf(x); }
namespace precise { __device__ __forceinline__ float rsqrt(float x) { return 1.0f / ::sqrtf(x); } }
namespace fast { __device__ __forceinline__ float rsqrt(float x) { return ::rsqrtf(x); } }
}  // namespace metal
// @provides sqrt
namespace metal {
__device__ __forceinline__ float sqrt(float x) { return ::sqrtf(x); }
namespace precise { __device__ __forceinline__ float sqrt(float x) { return ::sqrtf(x); } }
}  // namespace metal
// @provides exp
namespace metal {
__device__ __forceinline__ float exp(float x) { return ::expf(x); }
namespace precise { __device__ __forceinline__ float exp(float x) { return ::expf(x); } }
namespace fast { __device__ __forceinline__ float exp(float x) { return ::__expf(x); } }
}  // namespace metal
// @provides exp2
namespace metal {
__device__ __forceinline__ float exp2(float x) { return ::exp2f(x); }
}  // namespace metal
// @provides log
namespace metal {
__device__ __forceinline__ float log(float x) { return ::logf(x); }
}  // namespace metal
// @provides log2
namespace metal {
__device__ __forceinline__ float log2(float x) { return ::log2f(x); }
}  // namespace metal
// @provides cos
namespace metal {
__device__ __forceinline__ float cos(float x) { return ::cosf(x); }
namespace precise { __device__ __forceinline__ float cos(float x) { return ::cosf(x); } }
namespace fast { __device__ __forceinline__ float cos(float x) { return ::__cosf(x); } }
}  // namespace metal
// @provides sin
namespace metal {
__device__ __forceinline__ float sin(float x) { return ::sinf(x); }
namespace precise { __device__ __forceinline__ float sin(float x) { return ::sinf(x); } }
namespace fast { __device__ __forceinline__ float sin(float x) { return ::__sinf(x); } }
}  // namespace metal
// @provides abs fabs
namespace metal {
__device__ __forceinline__ float abs(float x) { return ::fabsf(x); }
__device__ __forceinline__ float fabs(float x) { return ::fabsf(x); }
}  // namespace metal
// @provides fma
namespace metal {
__device__ __forceinline__ float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
}  // namespace metal
// @provides max
namespace metal {
template <typename U> __device__ __forceinline__ U max(U a, U b) { return a > b ? a : b; }
}  // namespace metal
// @provides min
namespace metal {
template <typename U> __device__ __forceinline__ U min(U a, U b) { return a < b ? a : b; }
}  // namespace metal
// @provides divide
namespace metal {
namespace precise { __device__ __forceinline__ float divide(float a, float b) { return a / b; } }
namespace fast { __device__ __forceinline__ float divide(float a, float b) { return ::__fdividef(a, b); } }
}  // namespace metal

// @provides UNROLL
#define UNROLL _Pragma("unroll")

// @provides METAL_FUNC THREADGROUP_PTR
// The helpers in common.h: device functions, and pointers to threadgroup
// memory are plain pointers. _core.py pastes common.h right here, before the
// address-space macros below (after them, __device__ would expand to
// __attribute__(()) and the helpers would become host functions).
#define METAL_FUNC __device__ __forceinline__
#define THREADGROUP_PTR

// ---- address spaces ----
// Address-space qualifiers: CUDA has one generic address space for pointers,
// and threadgroup memory is __shared__. These come last: CUDA's own
// __device__ / __constant__ expand to __attribute__((device)) /
// __attribute__((constant)), which these macros would break if defined earlier.
#define device
#define constant
#define threadgroup __shared__
