// run_aoti_package PACKAGE INPUTS OUTPUTS: loads an AOTInductor package (.pt2), runs it on the
// tensors of INPUTS (a tuple or list saved with torch.save) and writes its outputs (a tuple) to
// OUTPUTS, readable by torch.load. The model's opqn_ext ops run because the program is linked with
// opqn_ext_ops, whose loading registers them; it refuses to run inside a process holding Python.
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "pickled_files.h"

namespace {

bool python_is_loaded() {
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    if (line.find("libpython") != std::string::npos || line.find("libtorch_python") != std::string::npos) {
      return true;
    }
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: run_aoti_package PACKAGE INPUTS OUTPUTS\n";
    return 2;
  }
  try {
    std::vector<at::Tensor> inputs;
    const c10::IValue loaded = load_pickled(argv[2]);
    const std::vector<c10::IValue> given =
        loaded.isTuple() ? loaded.toTupleRef().elements().vec() : loaded.toListRef().vec();
    for (const c10::IValue& value : given) inputs.push_back(value.toTensor());
    torch::inductor::AOTIModelPackageLoader model(argv[1]);
    const std::vector<at::Tensor> outputs = model.run(inputs);
    if (python_is_loaded()) {
      std::cerr << "run_aoti_package: Python was loaded into the process\n";
      return 3;
    }
    save_pickled(argv[3], std::vector<c10::IValue>(outputs.begin(), outputs.end()));
    std::cout << "ran " << argv[1] << ": " << outputs.size() << " outputs\n";
  } catch (const std::exception& e) {
    std::cerr << "run_aoti_package: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
