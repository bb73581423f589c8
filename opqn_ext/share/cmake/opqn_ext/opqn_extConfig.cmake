# find_package(opqn_ext) for the C++ library inside the installed opqn-ext Python package, with
#   CMAKE_PREFIX_PATH="$(python -c 'import opqn_ext; print(opqn_ext.cmake_prefix_path)');$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# The imported target opqn_ext::opqn_ext_ops: the ops library (opqn_ext/lib/libopqn_ext_ops.so), its
# headers (opqn_ext/ops.h, and opqn_ext/index.h where the index files were built: then
# OPQN_EXT_INDEX_FILES is defined), and torch through find_dependency(Torch), which must be the torch
# the package was built against. (A `cmake --install` of CMakeLists.txt writes its own package.)
include(CMakeFindDependencyMacro)
include("${CMAKE_CURRENT_LIST_DIR}/opqn_extFindTorch.cmake")
find_dependency(Torch)
include("${CMAKE_CURRENT_LIST_DIR}/opqn_extBuild.cmake")  # OPQN_EXT_INDEX_FILES: ON or OFF

get_filename_component(_opqn_ext_package "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET opqn_ext::opqn_ext_ops)
  add_library(opqn_ext::opqn_ext_ops SHARED IMPORTED)
  set_target_properties(opqn_ext::opqn_ext_ops PROPERTIES
    IMPORTED_LOCATION "${_opqn_ext_package}/lib/libopqn_ext_ops.so"
    IMPORTED_SONAME "libopqn_ext_ops.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_opqn_ext_package}/include"
    INTERFACE_LINK_LIBRARIES torch
    # a program may never name a symbol of the library (models call the ops through the dispatcher)
    INTERFACE_LINK_OPTIONS "$<$<PLATFORM_ID:Linux>:LINKER:--no-as-needed>")
  if(OPQN_EXT_INDEX_FILES)
    set_property(TARGET opqn_ext::opqn_ext_ops PROPERTY INTERFACE_COMPILE_DEFINITIONS OPQN_EXT_INDEX_FILES=1)
  endif()
endif()
