import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

/// Site → function symbol or name, per session: from the names saved with the trace
/// (`DIR/symbols`, `SymbolFile`), or, for objects without them (traces from before they were
/// saved), from the object's file on disk, with a warning when that file is not the one recorded.
final class Symbolizer {
  private struct Saved {
    let bias: UInt64
    let file: SymbolFile
  }
  private var saved: [String: [Saved]] = [:]
  private var tables: [String: SymbolTable] = [:]
  /// Objects named from disk although they changed since recording, not yet warned about.
  private var changed: [String: String] = [:]
  private var warned: Set<String> = []
  private let style: Demangler.Style

  init(_ trace: Trace, demangle style: Demangler.Style = .full) {
    self.style = style
    var symbolFiles: [String: SymbolFile?] = [:]
    var elfFiles: [String: ELFFile] = [:]
    for process in trace.processes {
      var inputs: [SymbolTable.Input] = []
      var own: [Saved] = []
      for object in process.objects {
        if let key = object.symbols {
          let file =
            symbolFiles[key]
            ?? Files.readText("\(trace.directory)/symbols/\(key).sym").flatMap { try? SymbolFile(text: $0) }
          symbolFiles.updateValue(file, forKey: key)
          if let file {
            own.append(Saved(bias: object.bias, file: file))
            continue
          }
        }
        guard let file = elfFiles[object.path] ?? (try? ELFFile(path: object.path)) else { continue }
        elfFiles[object.path] = file
        if let reason = Self.difference(object, file, recordedAt: process.startRealtimeNanoseconds) {
          changed[object.path] = reason
        }
        inputs.append(SymbolTable.Input(path: object.path, bias: object.bias, file: file))
      }
      saved[process.session] = own
      if !inputs.isEmpty { tables[process.session] = try? SymbolTable(inputs) }
    }
  }

  /// Why the file on disk may not be the object that was recorded, or nil.
  private static func difference(
    _ object: TracedProcess.Object, _ file: ELFFile, recordedAt start: UInt64
  ) -> String? {
    let onDisk = file.buildID().map(TracedProcess.Object.hex)
    if let recorded = object.buildID {
      return onDisk == recorded ? nil : "its build-id is not the recorded one (rebuilt since?)"
    }
    if let identity = FileIdentity(path: object.path), identity.modified > start {
      return "it was modified after it was recorded, and no names were saved with the trace"
    }
    if object.symbols != nil { return "its saved symbols are missing, and it has no build-id to check" }
    return nil
  }

  /// The symbol of the function at `site` as its object names it (or its address).
  func symbol(session: String, site: UInt64) -> String {
    for object in saved[session] ?? [] {
      if let name = object.file.name(atSite: site &- object.bias) { return name }
    }
    guard let table = tables[session], let index = table.function(containing: site) else {
      return "0x" + String(site, radix: 16)
    }
    let path = table.objects[table.functions[index].object].path
    if let reason = changed[path], warned.insert(path).inserted {
      FileHandle.standardError.write(Data("tracery: warning: \(path): \(reason); names may be wrong\n".utf8))
    }
    return table.functions[index].name
  }

  /// The function at `site` as `style` shows it.
  func name(session: String, site: UInt64) -> String {
    Demangler.name(symbol(session: session, site: site), style: style)
  }

  private var named: [String: FunctionNames] = [:]

  /// The names of the function at `site`: each distinct symbol demangled once.
  func names(session: String, site: UInt64) -> FunctionNames {
    let symbol = symbol(session: session, site: site)
    if let known = named[symbol] { return known }
    let names = FunctionNames(
      symbol: symbol, full: Demangler.demangle(symbol), label: Demangler.name(symbol, style: style))
    named[symbol] = names
    return names
  }

  /// The full names of every traced function (every function with a patch site in the traced
  /// objects), demangled.
  var tracedNames: Set<String> {
    var result = Set<String>()
    for objects in saved.values {
      for object in objects { for (_, name) in object.file.sites { result.insert(Demangler.demangle(name)) } }
    }
    for table in tables.values {
      for index in table.patchableFunctions { result.insert(Demangler.demangle(table.functions[index].name)) }
    }
    return result
  }
}
