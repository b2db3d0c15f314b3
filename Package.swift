// swift-tools-version: 6.1
//
// Build flags used by this package:
// - Examples/demo is compiled with `-fpatchable-function-entry=5` (unsafeFlags; fine in the root
//   package, never in a library product others depend on by version).
// - Test fixtures use `__attribute__((patchable_function_entry(5, 0)))` and need no flag.
// Environment variables read by the tests (not by the build):
// - TRACERY_LONG_TESTS=1 runs the storm tests for longer.
import PackageDescription

// The modules the agent carries into every traced process: generic types' metadata reached
// through accessor calls, not by demangling their mangled names at first use (the default: smaller
// code, but a fresh process demangled dozens of types in the agent's start, ~0.1 ms of each
// traced child).
let agentModule: [SwiftSetting] = [
  .unsafeFlags(["-Xfrontend", "-disable-concrete-type-metadata-mangled-name-accessors"])
]

let package = Package(
  name: "Tracery",
  products: [
    .library(name: "TraceryELF", targets: ["TraceryELF"]),
    .library(name: "TraceryX86", targets: ["TraceryX86"]),
    .library(name: "TraceryCore", targets: ["TraceryCore"]),
    // The C handler ABI (tracery.h), for handlers written in C.
    .library(name: "CTracery", targets: ["CTracery"]),
    .executable(name: "tracery", targets: ["tracery"]),
    // The agent `tracery record` preloads (libtracery-agent.so).
    .library(name: "tracery-agent", type: .dynamic, targets: ["TraceryAgent"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2")
  ],
  targets: [
    // C: only what Swift cannot say (syscall(2), getauxval, the SIGTRAP handler that edits ucontext,
    // dl_iterate_phdr's callback). Never a product.
    .target(name: "CTraceryShims"),
    .target(name: "CTracery"),
    // The traced function and empty C handlers of `tracery bench trigger`.
    .target(name: "CTraceryBench", dependencies: ["CTracery"]),
    .target(name: "TraceryELF", swiftSettings: agentModule),
    .target(name: "TraceryX86", swiftSettings: agentModule),
    .target(
      name: "TraceryCore", dependencies: ["TraceryELF", "TraceryX86", "CTraceryShims", "CTracery"],
      swiftSettings: agentModule),
    // Event format, per-thread event files, the trace directory reader and its reports. Imports
    // no other Tracery module (and not Foundation: the agent links it).
    // Dynamic exclusivity checks off: the readers' per-event loops touch class state and
    // captured variables millions of times, from one thread (measured: ~7% of a replay).
    .target(
      name: "TraceryRecord", dependencies: ["CTracery", "CTraceryShims"],
      swiftSettings: agentModule + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]),
    .target(name: "CTraceryAgent", dependencies: ["CTraceryShims"]),
    // ptrace for `record -p` (glibc's ptrace is variadic).
    .target(name: "CTraceryInject"),
    // The agent carries its own Swift runtime, kept private: loading libswiftCore.so and its
    // companions cost every traced process 2.2 ms (it starts from `__libc_start_main`, after the
    // runtime's initializers: see CTraceryAgent). The runtime's C++ library is linked in too
    // (`link/libstdc++.so` is a linker script naming libstdc++.a, found first through -L): loading
    // libstdc++.so cost every C program ~0.2 ms more. Its symbols stay private (--exclude-libs);
    // the one it shares a name with, `__cxa_begin_catch`, is the shims' interposer, linked first
    // and kept (--allow-multiple-definition; gold then rejected the archive's probe notes, lld
    // does not). Relative relocations packed (DT_RELR, glibc 2.36): the loader reads 4 KB of them
    // in each process instead of 500 KB. Not libm: `link/libm.so` names it AS_NEEDED, and the
    // agent defines what the standard library names of it (CTraceryAgent's libm.c).
    .target(
      name: "TraceryAgent",
      dependencies: ["TraceryCore", "TraceryRecord", "CTraceryAgent", "CTraceryShims"],
      swiftSettings: agentModule,
      linkerSettings: [
        .unsafeFlags([
          "-static-stdlib", "-use-ld=lld", "-LSources/CTraceryAgent/link", "-Xlinker", "--allow-multiple-definition",
          "-Xlinker", "--exclude-libs=ALL", "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs",
        ])
      ]),
    // A release build links the Swift runtime and Foundation in (as the agent does): loading and
    // relocating them at every start took ~12 ms of each command (`tracery record` of a short
    // program: 40 -> 28 ms). Debug builds, which the tests link against, keep them shared.
    .executableTarget(
      name: "tracery",
      dependencies: [
        "TraceryCore", "TraceryELF", "TraceryRecord", "TraceryX86", "CTraceryBench", "CTraceryInject",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      swiftSettings: [.unsafeFlags(["-static-stdlib"], .when(configuration: .release))],
      linkerSettings: [.unsafeFlags(["-static-stdlib"], .when(configuration: .release))]
    ),
    // The bundled demo program of the README, built by clang with one 5-byte NOP per function entry.
    .executableTarget(
      name: "demo",
      path: "Examples/demo",
      cSettings: [.unsafeFlags(["-O1", "-fpatchable-function-entry=5", "-fno-omit-frame-pointer"])]
    ),
    // A separate single-threaded process the core tests drive (sled conversion needs one thread).
    .executableTarget(name: "tracery-testhost", dependencies: ["TraceryCore"], path: "Tests/TestHost"),
    .target(name: "TraceryFixtures", dependencies: ["CTracery"], path: "Tests/Fixtures"),
    .target(name: "TraceryCxxFixtures", path: "Tests/CxxFixtures"),
    // Traced code built as programs ship: -O2 (sibling calls on) with a NOP at every entry. (SwiftPM
    // adds -fno-omit-frame-pointer last; the record tests build frame-pointer-less programs.)
    .target(
      name: "TraceryOptimizedFixtures", path: "Tests/OptimizedFixtures",
      cSettings: [.unsafeFlags(["-O2", "-fpatchable-function-entry=5"])],
      cxxSettings: [.unsafeFlags(["-O2", "-fpatchable-function-entry=5"])]),
    .target(name: "TraceryTestSupport", path: "Tests/TraceryTestSupport"),
    .testTarget(name: "TraceryELFTests", dependencies: ["TraceryELF", "TraceryTestSupport"]),
    .testTarget(name: "TraceryX86Tests", dependencies: ["TraceryX86", "TraceryTestSupport"]),
    .testTarget(name: "TraceryRecordTests", dependencies: ["TraceryRecord"]),
    .testTarget(
      name: "TraceryCoreTests",
      dependencies: [
        "TraceryCore", "TraceryFixtures", "TraceryCxxFixtures", "TraceryOptimizedFixtures", "TraceryTestSupport",
        "tracery-testhost",
      ],
      // TraceryCore's unwinder interposers (UnwindGuard.swift) must be in the executable's dynamic
      // symbol table to come before libgcc_s's: a program that links TraceryCore does the same.
      linkerSettings: [
        .unsafeFlags([
          "-Xlinker", "--export-dynamic-symbol=_Unwind_RaiseException",
          "-Xlinker", "--export-dynamic-symbol=_Unwind_ForcedUnwind",
          "-Xlinker", "--export-dynamic-symbol=_Unwind_Resume_or_Rethrow",
          "-Xlinker", "--export-dynamic-symbol=__cxa_begin_catch",
        ])
      ]
    ),
    .testTarget(
      name: "TraceryCLITests", dependencies: ["tracery", "demo", "TraceryTestSupport"],
      exclude: ["Programs"]),
  ]
)
