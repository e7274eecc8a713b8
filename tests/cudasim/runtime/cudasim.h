// cudasim.h: run the project's CUDA C++ kernel sources on the CPU, for tests.
//
// The build force-includes this header (g++ -include) before any rewritten kernel source
// (rewrite_sources.py). Parts, one job each:
//   core.h        CUDA threads as fibers, block barriers, warp collectives, launches
//   smem_check.h  shared-memory race checker and bank-conflict counter
//   cuda_api.h    built-in variables / intrinsics, the runtime API, cooperative_groups
//   ptx.h         the inline PTX our kernels use (mma, ldmatrix, cp.async), executed
#pragma once

#include "core.h"
#include "cuda_api.h"
#include "ptx.h"
