from bigkern.cli import command

command()
