import ArgumentParser
import Foundation
import TraceryCore
import TraceryELF
import TraceryRecord
import TraceryX86

struct List: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "List the patchable functions of a program and its libraries.",
    discussion: """
      Reads PROGRAM and every shared object it needs from disk (nothing is run) and prints each \
      function that starts with a patch site: its site address (link-time, as nm shows it), the \
      shape of the site, which section recorded it, and the function's name. With --relocate, also \
      the program's other functions as `record --relocate` would trace them (moved: a relocated \
      prologue; int3: through a trap, with why).
      """
  )

  @Option(
    name: .long,
    help: "Only functions any of whose names (symbol, demangled, simple) matches this glob (*, ?, [...]).")
  var match: String?

  @Option(help: Demangler.Style.help) var demangle: Demangler.Style = .no

  @Flag(name: .long, help: "Also list the objects that have no patch sites.")
  var all = false

  @Flag(
    name: .long,
    help: """
      Also list the program's functions without a patch site as `record --relocate` would trace them: \
      relocated (its first instructions moved out of line), through an int3 (and why it is not relocated), \
      or not at all (why).
      """)
  var relocate = false

  @Argument(help: "The program (a path, or a name looked up in PATH) or a shared object.")
  var program: String

  func validate() throws {
    if let match {
      do { _ = try Glob(match) } catch { throw ValidationError("invalid --match pattern: \(error)") }
    }
  }

  func run() throws {
    try reportingUserErrors {
      let path = try ProgramLocator.locate(program)
      let file: ELFFile
      do { file = try ELFFile(path: path) } catch { throw UserError("\(path): \(error)") }
      let glob = try match.map { try Glob($0) }
      var objects: [(name: String, path: String, file: ELFFile)] = [(Self.name(of: path), path, file)]
      var missing: [String] = []
      for library in LibraryResolver(environment: ProcessInfo.processInfo.environment).dependencies(
        of: path, file: file)
      {
        guard let libraryPath = library.path, let libraryFile = try? ELFFile(path: libraryPath) else {
          missing.append(library.name)
          continue
        }
        objects.append((library.name, libraryPath, libraryFile))
      }
      var output = ""
      var totalPatchable = 0
      var totalMatched = 0
      var withoutSites: [String] = []
      for (position, object) in objects.enumerated() {
        let relocating = relocate && position == 0
        let entryPoints = relocating ? EntryPoints(file: object.file, bias: 0) : nil
        let table: SymbolTable
        do {
          table = try SymbolTable([
            SymbolTable.Input(
              path: object.path, bias: 0, file: object.file, unnamed: entryPoints?.unnamedFunctions ?? [])
          ])
        } catch {
          throw UserError("\(object.path): \(error)")
        }
        // --relocate: how each function without a site would be traced (nil: it has a site).
        var planned: [Int: PatchSite.Survey] = [:]
        if relocating {
          for index in table.functions.indices
          where table.functions[index].site == nil && table.functions[index].size > 0 {
            let function = table.functions[index]
            let span = PatchSite.surveySpan(
              size: function.size, to: table.nextStart(after: index), from: function.address)
            guard
              let code = object.file.bytes(atAddress: function.address, count: span)
                ?? object.file.bytes(atAddress: function.address, count: Int(function.size))
            else { continue }
            planned[index] = code.withUnsafeBytes {
              PatchSite.survey(code: $0, size: Int(function.size), entry: function.address, entryPoints: entryPoints)
            }
          }
        }
        let patchable =
          (table.patchableFunctions
          + planned.keys.filter {
            if case .refused = planned[$0]! { false } else { true }
          }).sorted()
        totalPatchable += patchable.count
        guard !patchable.isEmpty else {
          withoutSites.append(object.name)
          if all { output += "\(object.name) (\(object.path)): no patch sites\n\n" }
          continue
        }
        // Functions that cannot be traced are listed too, with why (not counted as patchable).
        let rows = (table.patchableFunctions + planned.keys).sorted().filter { index in
          glob.map { Demangler.anyForm(of: table.functions[index].name, matches: $0.matches) } ?? true
        }
        totalMatched += rows.count
        guard !rows.isEmpty || all else { continue }
        output += "\(object.name) (\(object.path)): \(patchable.count) patchable function"
        output += patchable.count == 1 ? "\n" : "s\n"
        output += "  SITE                KIND      RECORDED IN                   FUNCTION\n"
        for index in rows {
          let function = table.functions[index]
          let kind: String
          let recorded: String
          var site = function.site ?? function.address
          switch planned[index] {
          case nil:
            let shape = object.file.bytes(atAddress: site, count: 5).map {
              X86Instruction.SiteShape(bytes: $0, at: site)
            }
            (kind, recorded) = (Self.kind(shape), function.siteSource?.sectionName ?? "")
          case .relocated(let length)?:
            (kind, recorded) = ("moved", "--relocate: \(length) bytes moved")
          case .trap(let why)?:
            (kind, recorded) = ("int3", "--relocate: \(why)")
          case .refused(let why)?:
            (kind, recorded) = ("refused", "--relocate: \(why)")
          case .nop?:
            continue
          }
          if planned[index] != nil, let bytes = object.file.bytes(atAddress: function.address, count: 4),
            bytes == X86Instruction.endbr64
          {
            site += 4
          }
          output += "  0x\(Self.hex16(site))  \(Self.pad(kind, 8))  \(Self.pad(recorded, 28))  "
          output += "\(Demangler.name(function.name, style: demangle))\n"
        }
        output += "\n"
      }
      if totalPatchable == 0 {
        throw UserError(
          """
          \(path) has no patch sites\(objects.count > 1 ? " (nor do the \(objects.count - 1) libraries it needs)" : ""). \
          Rebuild it with one of:
            clang -fpatchable-function-entry=5 ...                         (one 5-byte NOP per function)
            gcc -pg -mfentry -mnop-mcount -mrecord-mcount -fno-pie -no-pie ... (one 5-byte NOP, listed in __mcount_loc)
            gcc -fpatchable-function-entry=5 ...                           (five 1-byte NOPs, converted when traced)
          """)
      }
      if let match, totalMatched == 0 {
        throw UserError(
          "no patchable function matches '\(match)' (\(totalPatchable) patchable functions in \(path) and its libraries)"
        )
      }
      print(output, terminator: "")
      var summary = "\(glob == nil ? totalPatchable : totalMatched) function(s)"
      summary += " in \(objects.count - withoutSites.count) of \(objects.count) object(s)"
      if !withoutSites.isEmpty && !all { summary += "; no patch sites in \(withoutSites.joined(separator: ", "))" }
      if !missing.isEmpty { summary += "; not found: \(missing.joined(separator: ", "))" }
      print(summary)
    }
  }

  static func kind(_ shape: X86Instruction.SiteShape?) -> String {
    switch shape {
    case .nop5: return "nop5"
    case .nopSled: return "nop-sled"
    case .call: return "call"
    case .jmp: return "jmp"
    case .unknown, nil: return "unknown"
    }
  }

  static func name(of path: String) -> String { String(path.split(separator: "/").last ?? Substring(path)) }

  static func hex16(_ value: UInt64) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
  }

  static func pad(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
  }
}

/// Finds the program the user named: a path as given, or a bare name looked up in PATH.
enum ProgramLocator {
  static func locate(_ program: String) throws -> String {
    let manager = FileManager.default
    if program.contains("/") {
      var isDirectory: ObjCBool = false
      guard manager.fileExists(atPath: program, isDirectory: &isDirectory), !isDirectory.boolValue else {
        throw UserError("program not found: \(program)")
      }
      return URL(fileURLWithPath: program).standardizedFileURL.path
    }
    for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
      let candidate = "\(directory)/\(program)"
      if manager.isExecutableFile(atPath: candidate) { return candidate }
    }
    throw UserError("program not found: \(program) (not a path, and not in PATH)")
  }

  /// The ELF program that runs `path`: itself, or for a script (`#!INTERPRETER [ARG]`, as the
  /// kernel reads it: pyenv's and npm's shims, /usr/bin tools) its interpreter, through
  /// `/usr/bin/env NAME` too, and through scripts run by scripts (at most four).
  static func executable(behind path: String) throws -> String {
    var current = path
    for _ in 0..<4 {
      guard let handle = FileHandle(forReadingAtPath: current) else { return current }
      let head = handle.readData(ofLength: 256)
      try? handle.close()
      guard head.starts(with: Array("#!".utf8)) else { return current }
      let line = String(decoding: head.dropFirst(2).prefix { $0 != 0x0a }, as: UTF8.self)
      let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
      guard let interpreter = words.first else { throw UserError("\(current): a script without an interpreter") }
      if interpreter.hasSuffix("/env"), let name = words.dropFirst().first(where: { !$0.hasPrefix("-") }) {
        current = try locate(name)
      } else {
        current = try locate(interpreter)
      }
    }
    return current
  }
}
