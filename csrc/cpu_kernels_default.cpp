// The CPU kernels for the compiler's baseline ISA (NOTE: [CPU capability] in cpu_kernels.h).
#define PRSGD_CPU_NS default_cpu
#include "cpu_kernels_impl.h"
