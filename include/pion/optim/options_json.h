#pragma once
// JSON for the Options structs of pion/optim/options.h, derived from their field lists: the
// group options a checkpoint stores (every key present) and the optim-trace config reader
// (every key optional). Values are read at their type with their range through
// pion/core/input.h, so a bad value is a one-line pion::Error naming the key and the range.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pion/core/input.h"
#include "pion/optim/options.h"

namespace pion {

// The field names of `Options`, in declaration order.
template <class Options>
std::vector<std::string> option_names() {
  std::vector<std::string> names;
  Options::fields([&](const char* key, auto, const auto&) { names.emplace_back(key); });
  return names;
}

// Every field of `o` as a JSON object (numbers, bools, and enums by name).
template <class Options>
nlohmann::json options_to_json(const Options& o) {
  nlohmann::json j = nlohmann::json::object();
  Options::fields([&](const char* key, auto member, const auto& spec) {
    using Spec = std::decay_t<decltype(spec)>;
    if constexpr (std::is_same_v<Spec, Choices>) {
      j[key] = spec.names[static_cast<int>(o.*member)];
    } else {
      j[key] = o.*member;
    }
  });
  return j;
}

namespace options_detail {

// One value read at the field's type and range; `where` names it in messages.
template <class T, class Spec>
T read_field(const nlohmann::json& v, const Spec& spec, const std::string& where) {
  if constexpr (std::is_same_v<Spec, RealRange>) {
    return input::to_double(v, spec.lo, spec.hi, where, spec.lo_open, spec.hi_open);
  } else if constexpr (std::is_same_v<Spec, IntRange>) {
    return static_cast<T>(input::to_int(v, spec.lo, spec.hi, where));
  } else if constexpr (std::is_same_v<Spec, AnyBool>) {
    return input::to_bool(v, where);
  } else {
    static_assert(std::is_same_v<Spec, Choices>, "unknown field kind");
    if (v.is_string())
      for (int i = 0; i < spec.count; ++i)
        if (v.template get_ref<const std::string&>() == spec.names[i]) return static_cast<T>(i);
    throw Error(where + " must be " + allowed_text(spec) + ", got " + input::describe(v));
  }
}

}  // namespace options_detail

// Reads the fields of `o` from the object `j`. With `required`, every field must be present
// (group options from a checkpoint); otherwise an absent key leaves the field as it is (its
// default). Keys `j` has beyond the fields are not looked at. `where(key)` names a key in
// messages. The result is not validated beyond each field's own range.
template <class Options, class Where>
void read_options(const nlohmann::json& j, Options& o, bool required, const Where& where) {
  Options::fields([&](const char* key, auto member, const auto& spec) {
    using T = std::decay_t<decltype(o.*member)>;
    auto it = j.find(key);
    if (it == j.end()) {
      if (required) throw Error(where(key) + " is missing");
      return;
    }
    o.*member = options_detail::read_field<T>(*it, spec, where(key));
  });
}

// The group options a checkpoint stores for one param group of optimizer `kind`: every field
// present, typed and in range.
template <class Options>
Options options_from_group_json(const nlohmann::json& j, const std::string& kind) {
  if (!j.is_object())
    throw Error(kind + " group options must be a JSON object, got " + input::describe(j));
  Options o;
  read_options(j, o, true,
               [&](const char* key) { return kind + " group option '" + std::string(key) + "'"; });
  return o;
}

}  // namespace pion
