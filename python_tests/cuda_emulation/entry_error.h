// The error channel of the C entry points: each returns report(error), 0 when error is empty and 1
// otherwise, and emu_last_error() gives the message of the latest call.
#pragma once

#include <string>

namespace opqn_emu {

int report(const std::string& error);

}  // namespace opqn_emu
