# What torch's CMake package needs from this machine, before find_package(Torch): included by
# CMakeLists.txt and by the installed opqn_extConfig.cmake, so a program using the library finds
# torch as the library's build did. Nothing here is needed for a CPU-only libtorch.
# - the CUDA toolkit folder, preferred over an nvcc wrapper elsewhere on PATH (as setup.py does);
if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda)
endif()
# - nvrtc, which torch's CMake links and a pip-installed torch keeps in its nvidia/ wheels, next to
#   torch in site-packages (torch.utils.cmake_prefix_path is site-packages/torch/share/cmake,
#   or Torch_DIR its Torch/ folder)
set(_opqn_nvrtc_hints "${CUDA_TOOLKIT_ROOT_DIR}/lib64")
set(_opqn_torch_cmake_dirs ${CMAKE_PREFIX_PATH})
if(DEFINED Torch_DIR)
  list(APPEND _opqn_torch_cmake_dirs "${Torch_DIR}/..")
endif()
foreach(_opqn_dir IN LISTS _opqn_torch_cmake_dirs)
  get_filename_component(_opqn_site "${_opqn_dir}/../../.." ABSOLUTE)
  list(APPEND _opqn_nvrtc_hints "${_opqn_site}/nvidia/cu13/lib" "${_opqn_site}/nvidia/cuda_nvrtc/lib")
endforeach()
find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12 HINTS ${_opqn_nvrtc_hints})
# - an architecture list: torch's CMake otherwise probes the visible GPU and fails where there is none.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "9.0")
endif()
