// A single-threaded process the core tests drive: things that are only allowed while no other
// thread runs (rewriting gcc's 5×nop sleds) are tested here, in a process of our own.
//
//   tracery-testhost sleds LIBRARY PREFIX COUNT
//     loads LIBRARY, converts the sleds of PREFIX0..PREFIX<COUNT-1>, patches them all to counting
//     trampolines, calls each once through PREFIXtable, unpatches, and prints one result line.
import Glibc
import TraceryCore
import TraceryELF

typealias Function = @convention(c) (Int) -> Int

func fail(_ message: String) -> Never {
  print("FAIL \(message)")
  exit(1)
}

let arguments = CommandLine.arguments
guard arguments.count == 5, arguments[1] == "sleds", let count = Int(arguments[4]) else {
  fail("usage: tracery-testhost sleds LIBRARY PREFIX COUNT")
}
let (library, prefix) = (arguments[2], arguments[3])
guard let handle = dlopen(library, RTLD_NOW) else { fail("dlopen: \(String(cString: dlerror()))") }
let table = dlsym(handle, "\(prefix)table")!.assumingMemoryBound(to: Optional<Function>.self)
guard let entry = ProcessObjects.list().first(where: { $0.path == library }) else { fail("not loaded") }
let symbols: SymbolTable
do {
  symbols = try SymbolTable([SymbolTable.Input(path: library, bias: entry.bias, file: ELFFile(path: library))])
} catch { fail("\(error)") }
let sites = (0..<count).map { symbols.functions[symbols.functions(named: "\(prefix)\($0)")[0]].site! }
let shapesBefore = Set(sites.map { "\(ProcessObjects.shape(at: $0))" })

let converted = TextPatcher.shared.convertSleds(sites)
let convertedCount = converted.filter { $0 == .patched }.count
let nop5 = sites.map { TextPatcher.read($0) }
do {
  let probes = try CountingTrampolines(sites: sites, mode: .jmp)
  let patched = TextPatcher.shared.apply(
    sites.indices.map { PatchRequest(site: sites[$0], expected: nop5[$0], replacement: probes.branch($0)) })
  var wrong = 0
  for index in 0..<count where table[index]!(7) != 7 * (index % 97 + 3) + index { wrong += 1 }
  let counted = sites.indices.filter { probes.count($0) == 1 }.count
  let unpatched = TextPatcher.shared.apply(
    sites.indices.map { PatchRequest(site: sites[$0], expected: probes.branch($0), replacement: nop5[$0]) })
  let again = TextPatcher.shared.convertSleds(sites)
  print(
    "before=\(shapesBefore.sorted().joined(separator: ",")) converted=\(convertedCount) "
      + "patched=\(patched.filter { $0 == .patched }.count) wrong=\(wrong) counted=\(counted) "
      + "unpatched=\(unpatched.filter { $0 == .patched }.count) "
      + "after=\(Set(sites.map { "\(ProcessObjects.shape(at: $0))" }).sorted().joined(separator: ",")) "
      + "again=\(Set(again.map(\.description)).sorted().joined(separator: ","))")
} catch {
  fail("\(error)")
}
