// Which variant of the CPU kernels runs (cpu_isa.h): the best one this CPU supports, chosen
// when the extension loads, or a lower one asked for (SPARSEKERN_CPU_ISA, which
// sparsekern/_backend.py applies), so that every variant can be tested on one machine.
#pragma once
#include <string>
#include <vector>

namespace sparsekern {

// The variants compiled into this build, best first (e.g. avx512, avx2, baseline).
std::vector<std::string> cpu_isas_compiled();
// Those of them this CPU can run, best first.
std::vector<std::string> cpu_isas_supported();
// The variant channel_absmax_cpu and bn_relu_cpu run now.
std::string cpu_isa();
// Run variant `name` from now on ("auto": the best supported one). Throws std::invalid_argument,
// naming what is possible, if the name is unknown, not compiled in, or not supported by this CPU.
void set_cpu_isa(const std::string& name);

}  // namespace sparsekern
