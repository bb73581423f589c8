// The portable build of the row kernels (baseline instruction set), always compiled.
#define OPQN_ISA scalar
#include "cpu/row_kernels_impl.h"
