#if canImport(Glibc)
  import Glibc
#endif

/// Readable names for C++ (`__cxa_demangle`) and Swift (`swift_demangle`) symbols, through the
/// runtimes' own demanglers when this process has them loaded (looked up with dlsym, so a C
/// program pays nothing). Other names come back unchanged.
public enum Demangler {
  private typealias CxxDemangle =
    @convention(c) (
      UnsafePointer<CChar>, UnsafeMutablePointer<CChar>?, UnsafeMutablePointer<Int>?,
      UnsafeMutablePointer<Int32>?
    ) -> UnsafeMutablePointer<CChar>?
  private typealias SwiftDemangle =
    @convention(c) (UnsafePointer<CChar>, Int, UnsafeMutablePointer<CChar>?, UnsafeMutablePointer<Int>?, UInt32) ->
    UnsafeMutablePointer<CChar>?

  private static let cxx: CxxDemangle? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__cxa_demangle").map {
    unsafeBitCast($0, to: CxxDemangle.self)
  }
  private static let swift: SwiftDemangle? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "swift_demangle").map {
    unsafeBitCast($0, to: SwiftDemangle.self)
  }

  public static func demangle(_ name: String) -> String {
    if name.hasPrefix("_Z"), let cxx {
      var status: Int32 = 0
      if let result = cxx(name, nil, nil, &status), status == 0 {
        defer { free(result) }
        return String(cString: result)
      }
    }
    if name.hasPrefix("$s") || name.hasPrefix("_$s") || name.hasPrefix("$S"), let swift {
      if let result = swift(name, name.utf8.count, nil, nil, 0) {
        defer { free(result) }
        return String(cString: result)
      }
    }
    return name
  }

  /// A demangled C++ name up to its parameter list: the first `(` outside template brackets.
  public static func withoutParameters(_ name: String) -> String {
    var depth = 0
    for index in name.indices {
      switch name[index] {
      case "<": depth += 1
      case ">": depth -= 1
      case "(" where depth == 0 && index != name.startIndex: return String(name[..<index])
      default: break
      }
    }
    return name
  }
}
