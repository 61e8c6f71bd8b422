// CPU emulation: the runtime API lives in cuda_runtime.h (see there).
#pragma once
#include "cuda_runtime.h"
