import CTraceryShims
import TraceryELF
import TraceryX86

/// The ELF objects loaded into this process (`dl_iterate_phdr`), read from their files.
public enum ProcessObjects {
  /// One loaded object.
  public struct Entry: Sendable, Equatable {
    /// Absolute path of its file (the thread's /proc exe link resolved for the main program:
    /// /proc/self/exe is gone once the main thread has exited, while others run).
    public let path: String
    /// Runtime address = link-time address + bias.
    public let bias: UInt64
  }

  /// Where /proc/thread-self/exe points (one readlink, once in the agent's start:
  /// `MemoryMap.programLink`): the program's path, with " (deleted)" after it when its file was
  /// deleted; nil when it cannot be read.
  public static var executableLink: String? {
    MemoryMap.programLink { System.linkTarget("/proc/thread-self/exe") }
  }

  /// The file of a loaded object, from the name the loader keeps (`link_map.l_name`): empty for
  /// the program; as it was given to `dlopen`, so `./plugin.so` is relative (to the directory then
  /// current, which it normally still is); the vDSO's has no slash and no file (returned as is).
  public static func path(ofLoaded name: String) -> String {
    if name.isEmpty {
      // (A deleted program's link reads "PATH (deleted)": realpath then fails and the link
      // itself, which still opens the file, is the path.)
      return executableLink.flatMap {
        $0.hasPrefix("/") && !$0.hasSuffix(" (deleted)") ? $0 : nil
      }
        ?? System.resolvedPath("/proc/thread-self/exe")
    }
    return name.hasPrefix("/") || !name.contains("/") ? name : System.resolvedPath(name)
  }

  /// Every loaded object that has a file (the vDSO has none and is left out).
  public static func list() -> [Entry] {
    var capacity = 64
    while true {
      var raw = [ctracery_object](repeating: ctracery_object(name: nil, bias: 0), count: capacity)
      let count = ctracery_loaded_objects(&raw, capacity)
      if count > capacity {
        capacity = count + 16
        continue
      }
      var entries: [Entry] = []
      for object in raw.prefix(count) {
        let path = Self.path(ofLoaded: object.name.map { String(cString: $0) } ?? "")
        guard path.hasPrefix("/") else { continue }
        entries.append(Entry(path: path, bias: object.bias))
      }
      return entries
    }
  }

  /// The symbol table of the loaded objects `include` accepts, and the objects that could not be
  /// read (with why).
  /// `unnamed`: the objects whose functions no symbol names are added too (a stripped program's,
  /// from its call frames: `EntryPoints.unnamedFunctions`).
  public static func symbolTable(
    including include: (Entry) -> Bool = { _ in true }, unnamed: (Entry) -> Bool = { _ in false }
  ) -> (table: SymbolTable, unreadable: [(path: String, error: ELFError)]) {
    var inputs: [SymbolTable.Input] = []
    var unreadable: [(path: String, error: ELFError)] = []
    for entry in list() where include(entry) {
      do {
        // Their code is in memory: files are read without it, but for the objects whose entry
        // points are found in their code (`EntryPoints` decodes it), unless a process before
        // this one found them already (`EntryPoints.persistence`).
        let known = unnamed(entry) ? EntryPoints.persisted(path: entry.path, bias: entry.bias) : nil
        let findsEntryPoints = unnamed(entry) && known == nil
        let file = try findsEntryPoints ? ELFFile(path: entry.path) : ELFFile(pathWithoutCode: entry.path)
        let functions =
          unnamed(entry)
          ? (known ?? EntryPoints.of(file: file, path: entry.path, bias: entry.bias)).unnamedFunctions : []
        inputs.append(SymbolTable.Input(path: entry.path, bias: entry.bias, file: file, unnamed: functions))
      } catch {
        unreadable.append((entry.path, error))
      }
    }
    if let table = try? SymbolTable(inputs) { return (table, unreadable) }
    // Some object's symbol or site sections are corrupt: find it, drop it and say so, rather
    // than lose every object.
    var valid: [SymbolTable.Input] = []
    for input in inputs {
      do {
        _ = try SymbolTable([input])
        valid.append(input)
      } catch {
        unreadable.append((input.path, error))
      }
    }
    return ((try? SymbolTable(valid)) ?? (try! SymbolTable([])), unreadable)
  }

  /// The shape of the live bytes at `site` (which must be mapped readable: a site from a symbol
  /// table of loaded objects is).
  public static func shape(at site: UInt64) -> X86Instruction.SiteShape {
    X86Instruction.SiteShape(bytes: TextPatcher.read(site), at: site)
  }
}
